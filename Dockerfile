# dicomflow worker / SCP image. The same image runs every role; the command picks it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dicomflow ./dicomflow
COPY streams ./streams
COPY agents ./agents
COPY tables ./tables
COPY sinks ./sinks
COPY schemas ./schemas
COPY feeders ./feeders
RUN pip install --no-cache-dir .
ENV DICOMFLOW_HOME=/data
VOLUME ["/data"]
ENTRYPOINT ["dicomflow"]
CMD ["worker"]
