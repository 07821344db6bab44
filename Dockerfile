# sealmq: one image for every role of docker-compose.yml (pki bootstrap, embedded broker, backend,
# device simulator). Walk-through: docs/docker.md. Nothing secret is baked in: keys, certificates
# and passwords are created at run time into volumes by the `pki` service.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid/gid: the Mosquitto container of docker/compose.mosquitto.yml runs as the same ids to
# read the 0600 files this image writes into the shared broker volume.
RUN groupadd --system --gid 10001 sealmq \
 && useradd --system --uid 10001 --gid sealmq --home-dir /home/sealmq --create-home \
            --shell /usr/sbin/nologin sealmq

WORKDIR /src
# Dependencies first (their own layer, rebuilt only when the lock changes), exact versions.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

# The same install as scripts/setup (`pip install .`, not editable), constrained by the lock.
COPY pyproject.toml README.md ./
COPY sealmq/ sealmq/
COPY pki/ pki/
COPY broker/ broker/
COPY device/ device/
COPY backend/ backend/
COPY runtime/ runtime/
COPY app/ app/
RUN pip install --no-cache-dir -c requirements.lock . \
 && rm -rf /src

COPY docker/bootstrap.sh /usr/local/bin/sealmq-bootstrap
COPY docker/healthcheck.py /usr/local/bin/sealmq-healthcheck
COPY img/ /usr/share/sealmq/img/

# Mount points of the compose volumes. Created here, owned by sealmq, so that a fresh named volume
# takes this ownership and mode when first mounted.
RUN chmod 0755 /usr/local/bin/sealmq-bootstrap /usr/local/bin/sealmq-healthcheck \
 && install -d -o sealmq -g sealmq -m 0700 /pki /publish/backend /publish/devices /publish/db /identity /broker /data /state

USER 10001:10001
WORKDIR /home/sealmq
# mqtts: client certificates (8883), passwords for monitors (8884); 1883: plain TCP, for loopback only
EXPOSE 1883 8883 8884
EXPOSE 8080
# Default check: an MQTT broker at $SEALMQ_MQTT_HOST:$SEALMQ_MQTT_PORT (127.0.0.1:1883 = this container)
# answers a CONNECT. docker-compose.yml gives the backend its own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 CMD ["sealmq-healthcheck"]
CMD ["sealmq", "--help"]
