# Source this on a lent GPU machine (see bench/RESULTS.md): installs the wheels carried in .whl/
# (faiss-cpu, fastapi & co., which that image lacks) into /tmp/site and puts them, the package and
# the CLI on PYTHONPATH.  Usage: `source bench/device_env.sh || exit`
# The wheels (cp312 manylinux x86_64, the versions of a local `.venv`, `pip download --no-deps`):
# faiss-cpu compressed-tensors loguru psutil fastapi starlette pydantic pydantic-core
# annotated-types annotated-doc typing-inspection opentelemetry-api uvicorn h11 anyio sniffio
# httpx httpcore idna certifi typer click shellingham rich markdown-it-py mdurl, and for the GPU
# tests pytest iniconfig pluggy pygments.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/cli PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, faiss, fastapi; print('torch', torch.__version__, 'transformers', transformers.__version__, 'faiss', faiss.__version__)"
