# The image every node of cluster.yaml runs: Ray 2.60.0 with CUDA, plus torch, torchvision and
# raydeq's other dependencies as pyproject.toml pins them, so that a node only installs the
# synced checkout (pip install --no-deps -e). From the repository root:
#   docker build -t ghcr.io/YOUR-ORG/raydeq:0.1.0 . && docker push ghcr.io/YOUR-ORG/raydeq:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

COPY pyproject.toml /tmp/pyproject.toml
# torch and torchvision from PyTorch's CUDA 13.0 index (drivers >= 580); the rest from PyPI.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cu130 \
        -r /tmp/requirements.txt \
    && python -c "import ray, torch, torchvision; assert ray.__version__ == '2.60.0', ray.__version__; print(torch.__version__, torchvision.__version__)"
