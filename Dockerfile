# Echo server image: `echoctl serve` as a non-root user, with the project's functions and
# associations in /app.
#
#   docker build -t echo-realtime .
#   docker run -p 127.0.0.1:3000:3000 -e ECHO_SECRET=... echo-realtime
#
# BASE_IMAGE: any Debian-like image with Python 3.11+ (python3 -m venv works).
# ECHO_SRC / PROJECT: where Echo's sources and the project sit in the build context. Both
# are the repository root by default; `echoctl deploy --target docker` sends a context with
# Echo's sources and your project side by side.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG ECHO_SRC=.
ARG PROJECT=.
# Only set when the builder passes them (a mirror instead of PyPI)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PATH=/opt/echo/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/echo \
 && groupadd --system --gid 10001 echo \
 && useradd --system --uid 10001 --gid echo --home-dir /app --no-create-home echo

# Dependencies first, from pyproject.toml alone: a change to Echo's code or to the project
# does not reinstall them.
COPY ${ECHO_SRC}/pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['aws']))" > /src/requirements.txt \
 && pip install -r /src/requirements.txt

# Echo itself (the wheel carries the demo project as `echoctl init`'s template)
COPY ${ECHO_SRC}/README.md ${ECHO_SRC}/associations.json /src/
COPY ${ECHO_SRC}/echo /src/echo
COPY ${ECHO_SRC}/functions /src/functions
COPY ${ECHO_SRC}/apps /src/apps
RUN pip install --no-deps /src && rm -rf /src

# The project: functions and associations (echo.toml when there is one)
WORKDIR /app
RUN chown echo:echo /app
COPY --chown=echo:echo ${PROJECT}/functions /app/functions
COPY --chown=echo:echo ${PROJECT}/associations.json ${PROJECT}/echo.tom[l] /app/

USER 10001
ENV ECHO_HOST=0.0.0.0 \
    ECHO_PORT=3000
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ECHO_PORT', '3000'), timeout=2)"]
CMD ["echoctl", "serve"]
