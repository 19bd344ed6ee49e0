"""The learner side: RLlib-style policy module and learner, parameter server."""
