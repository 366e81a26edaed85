# Builds the three binaries (sparky, sparky-ingress, sparky-worker) into one small runtime image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins \
 && mkdir /out && cp target/release/sparky target/release/sparky-ingress target/release/sparky-worker /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 sparky
COPY --from=build /out/ /usr/local/bin/
USER sparky
ENV LOG_FORMAT=json
EXPOSE 3000 9100
CMD ["sparky-ingress"]
