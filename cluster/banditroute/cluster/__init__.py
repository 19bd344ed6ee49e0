"""Running banditroute as one application: typed app config, local or cluster start."""
