"""banditroute's core layer: records, config, storage, data, names and security.

Every other component (policy, serve, feedback, learner, cluster) may import
this package; it imports none of them (docs/architecture.md, the import
contracts in pyproject.toml).
"""
