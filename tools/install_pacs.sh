#!/usr/bin/env bash
# Orthanc (with its DICOMweb plugin) and DCMTK for tests/test_dicom_orthanc.py: the tests start their
# own Orthanc on loopback ports in a temporary folder; the Debian service is never started here.
#   usage: tools/install_pacs.sh
set -euo pipefail

if [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v storescu >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install_pacs: need root (or sudo) for apt-get" >&2; exit 1; }
    SUDO="sudo"
fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends orthanc orthanc-dicomweb dcmtk
/usr/sbin/Orthanc --version | head -1
