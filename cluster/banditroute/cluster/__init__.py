"""Running banditroute as one application: the only component that wires the others together.

- ``config``: ``AppConfig``, the one application config (`serve`, `up`, build_app's args, serveConfigV2) and its loader.
- ``online``: ``start_online_loop``, the one wiring of the loop's actors and the routers' config.
- ``app``: ``build_app`` (the Serve import path ``banditroute.cluster.app:build_app``), ``router_application``.
- ``launch``: start modes (local / cluster Ray) and the generated Serve config.
- ``runner``: start and stop the application from this process (`banditroute serve`, and the start/stop `up` shares).
- ``up``: `banditroute up`'s local run: `serve`'s startup plus the replay driver, settle, summary.
- ``traffic``, ``progress_view``, ``plotting``, ``summary``, ``cold_start``: its replay driver, view, plot,
  verdict against fixed models and starting policy.
"""
