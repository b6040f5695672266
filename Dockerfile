# pgsluice: slim image, non-root. Build: docker build -t pgsluice .
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 pgsluice
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy proxy
COPY planner planner
COPY cache cache
COPY loadtest loadtest
COPY protos protos
RUN pip install --no-cache-dir . && rm -rf /root/.cache
# where `pgsluice make-cert` writes in docker-compose.yml: a new volume takes this owner
RUN install -d -o pgsluice -g pgsluice /certs
USER pgsluice
EXPOSE 6543 9187 50051
ENTRYPOINT ["pgsluice"]
CMD ["serve", "--listen", "0.0.0.0:6543", "--metrics-listen", "0.0.0.0:9187", "--grpc-listen", "0.0.0.0:50051"]
