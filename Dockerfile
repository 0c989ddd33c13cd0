# facepipe project image: the workers (cpu and gpu pools) run flows in it.
# torch from the package index is the standard CUDA build: the same image runs on CPU hosts and,
# with the NVIDIA container toolkit, on GPU hosts.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FACEPIPE_DATA_ROOT=/data \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /app
# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p datasets models tasks flows && touch datasets/__init__.py models/__init__.py tasks/__init__.py flows/__init__.py \
 && pip install . && pip uninstall -y facepipe
COPY . .
RUN pip install --no-deps -e . && python -c "import datasets, models, tasks, flows; print('facepipe ok')"

# Run as an unprivileged user: flows write only to /data (the volume) and the user's home. A data
# volume filled by an older image (root) needs one `docker compose run --rm -u root worker-cpu
# chown -R facepipe:facepipe /data`.
RUN useradd --create-home --uid 1000 --user-group facepipe && mkdir -p /data && chown facepipe:facepipe /data
USER facepipe

VOLUME ["/data"]
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
