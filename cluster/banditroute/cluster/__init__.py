"""Running banditroute as one application: the only component that wires the others together.

- ``config``: ``AppConfig``, the one application config (`serve`, `up`, build_app's args, serveConfigV2) and its loader.
- ``online``: ``start_online_loop``, the one wiring of the loop's actors and the routers' config.
- ``app``: ``build_app`` (the Serve import path ``banditroute.cluster.app:build_app``), ``router_application``.
- ``launch``: start modes (local / cluster Ray) and the generated Serve config.
- ``up``: `banditroute up`'s local run (start, deploy, wait healthy, drive, settle, summary).
- ``traffic``, ``progress_view``, ``plotting``, ``cold_start``: its replay driver, view, plot and starting policy.
"""
