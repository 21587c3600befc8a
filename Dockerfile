# One image for the api, worker and dashboard services, installed the way the README installs
# (scripts/setup.sh: a virtual environment in the repository, torch pinned to 2.13.0).
#   CPU:  docker build -t tvkd .
#   GPU:  docker build -t tvkd:cuda --build-arg PIP_EXTRA_INDEX_URL=<a CUDA wheel index> .
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TVKD_HOME=/data \
    PATH=/app/.venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY tvkd/ tvkd/
COPY service/ service/
COPY worker/ worker/
COPY dashboard/ dashboard/
RUN PYTHON=python3 scripts/setup.sh service,dashboard,trackers && rm -rf /root/.cache/pip

VOLUME ["/data"]
EXPOSE 8000 8501
CMD ["tvkd", "serve", "--host", "0.0.0.0", "--port", "8000"]
