# The demo PACS of compose.yaml: Debian's Orthanc (the same package the end-to-end tests run)
# with the DICOMweb plugin, started as `Orthanc /etc/orthanc/orthanc.json` with
# config/orthanc/ mounted (routing of CR/DX to the node).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends orthanc orthanc-dicomweb \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/orthanc/db \
 && chown -R orthanc:orthanc /var/lib/orthanc
USER orthanc
EXPOSE 4242 8042
CMD ["Orthanc", "/etc/orthanc/orthanc.json"]
