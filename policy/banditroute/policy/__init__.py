"""The routing policy: one interface (``base.RoutingPolicy``) with two kinds, ``barp`` and ``identity``
(built by kind from ``checkpoint.POLICY_KINDS``), one decision rule (``decide``), reward, prompt
encoders, training and routers."""
