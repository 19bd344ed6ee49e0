"""The routing policy: reward, prompt encoders, the BaRP network, training and routers."""
