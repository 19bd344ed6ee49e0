# banditroute image for KubeRay (head, workers, RayJob submitter).
#
# CPU image (default): every Python package from requirements/image.lock,
# checked against its sha256 (pip --require-hashes):
#   docker build -t REGISTRY/banditroute:TAG .
# GPU image (CUDA base + PyPI's CUDA torch wheel, requirements/image-gpu.lock):
#   docker build -t REGISTRY/banditroute:TAG-gpu \
#     --build-arg RAY_VARIANT=-gpu --build-arg LOCK_FILE=requirements/image-gpu.lock .
# Release builds pin the base image by digest and fail without one
# (docs/deploy.md, "Dependencies and the release steps"):
#   docker build --build-arg RELEASE=1 --build-arg BASE_DIGEST=sha256:<digest of the tag> ...
#
# RAY_VERSION must equal rayVersion in k8s/ and the ray pin in pyproject.toml
# and in the lock files (tests/test_image_lock.py and tests/test_k8s_manifests.py check).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
# "" = the CPU image; "-gpu" (or a specific "-cuXXX") = the CUDA image.
ARG RAY_VARIANT=
# sha256:... of rayproject/ray:<tag> (docker buildx imagetools inspect <tag>); empty = the tag alone.
ARG BASE_DIGEST=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${RAY_VARIANT}${BASE_DIGEST:+@}${BASE_DIGEST}

# 1 = a release build: refuse to build on a base image pinned by tag only.
ARG RELEASE=0
ARG BASE_DIGEST=
RUN if [ "$RELEASE" = "1" ] && ! echo "$BASE_DIGEST" | grep -Eq '^sha256:[0-9a-f]{64}$'; then \
      echo "RELEASE=1 needs --build-arg BASE_DIGEST=sha256:<64 hex> (the base image's digest)" >&2; exit 1; \
    fi

ARG LOCK_FILE=requirements/image.lock
# The CPU torch wheel (torch==2.13.0+cpu in image.lock) lives on PyTorch's index;
# its hash in the lock is checked all the same.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The encoder ships inside a Python package: nothing is fetched at run time.
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/ray/banditroute
# The lock first: the dependency layer is cached until the lock changes.
COPY --chown=ray:users requirements/ requirements/
RUN pip install --require-hashes --no-deps -r "${LOCK_FILE}" --extra-index-url "${TORCH_INDEX_URL}"
COPY --chown=ray:users . .
# The project itself: its dependencies and its build backend (hatchling) are all in the lock.
RUN pip install --no-deps --no-build-isolation . \
    && python -c "import importlib.metadata as m, banditroute.cli, ray, torch; print('banditroute', m.version('banditroute'), 'ray', ray.__version__, 'torch', torch.__version__)"

WORKDIR /home/ray
