#!/usr/bin/env bash
# Make a private CA and NBD server and client certificates for `shale serve --nbd-tls-*`, with openssl.
#
#   tools/nbd-tls-certs.sh DIR [SERVER_NAME ...]
#
# DIR gets ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem, client-cert.pem and client-key.pem: the
# file names qemu's `--object tls-creds-x509,dir=DIR` and libnbd's `tls-certificates=DIR` look for, so the same
# directory serves the daemon, qemu-img/qemu-io and nbdinfo/nbdcopy. The server certificate names every
# SERVER_NAME (DNS names or IP addresses; default: localhost, 127.0.0.1 and this host's name); clients check
# it against the host they connect to. Existing files are kept: delete DIR to start over.
#
# A private CA is right for a cluster's own hosts; with a real PKI, give the daemon that certificate instead.
set -euo pipefail

dir=${1:?usage: nbd-tls-certs.sh DIR [SERVER_NAME ...]}
shift
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    names=(localhost 127.0.0.1 "$(hostname)")
fi
san=""
for n in "${names[@]}"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}

mkdir -p "$dir"
cd "$dir"
umask 077
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -e ca-cert.pem ]; then
    key ca-key.pem
    openssl req -x509 -new -key ca-key.pem -out ca-cert.pem -days 3650 -subj "/CN=Shale NBD CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

# leaf NAME CN EXTENDED_KEY_USAGE [EXTRA_EXTENSION]
leaf() {
    [ -e "$1-cert.pem" ] && return
    key "$1-key.pem"
    openssl req -new -key "$1-key.pem" -out "$1.csr" -subj "/CN=$2"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n%s\n' \
        "$3" "${4:-}" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
        -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
leaf server "Shale NBD server" serverAuth "subjectAltName=$san"
leaf client "Shale NBD client" clientAuth
chmod 644 ./*-cert.pem
echo "$dir: ca-cert.pem server-cert.pem server-key.pem client-cert.pem client-key.pem (server names: ${names[*]})"
