#!/usr/bin/env bash
# Make the certificates and keys of the TLS deployment (docker-compose.tls.yml):
#
#   ca.crt, ca.key            a private certificate authority (ca.key stays with you)
#   server.pem, server.key    the SuperLink's certificate, signed by the CA, valid for the
#                             names in $SERVER_SANS (default: superlink, localhost, 127.0.0.1)
#   supernode-<n>.key/.pub    one SuperNode authentication key pair (ECDSA P-384, OpenSSH
#                             format) per name in $SUPERNODES (default: "us eu")
#
# Usage: docker/certs/generate.sh [OUT_DIR]      (default OUT_DIR: docker/certs/out)
# Environment: SERVER_SANS (an openssl subjectAltName list), SUPERNODES, CERT_DAYS (365).
#
# Existing files are never overwritten: a new CA would lock out every SuperNode that trusts
# the old one. Delete OUT_DIR to start over.
#
# File modes: OUT_DIR is 0700, so on this machine only you can reach the files in it. The
# keys that containers read (server.key, supernode-*.key) are 0644 *inside* that directory:
# Docker bind-mounts each file by itself, and the Flower images run as uid 49999, which must
# be able to read them. ca.key is never mounted and stays 0600.
set -euo pipefail

out="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/out}"
sans="${SERVER_SANS:-DNS:superlink,DNS:localhost,IP:127.0.0.1}"
supernodes="${SUPERNODES:-us eu}"
days="${CERT_DAYS:-365}"

for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "generate.sh: '$tool' is not installed" >&2; exit 1; }
done
for name in ca.crt ca.key server.pem server.key; do
  if [ -e "$out/$name" ]; then
    echo "generate.sh: $out/$name exists; delete $out to make new certificates" >&2
    exit 1
  fi
done

mkdir -p "$out"
chmod 700 "$out"
umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The certificate authority.
openssl req -x509 -new -newkey rsa:3072 -nodes -sha256 -days "$days" \
  -subj "/O=rebasin-fl/CN=rebasin-fl certificate authority" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null

# The SuperLink's key and certificate: a TLS server certificate for every name in $sans.
openssl req -new -newkey rsa:3072 -nodes -sha256 \
  -subj "/O=rebasin-fl/CN=superlink" \
  -keyout "$out/server.key" -out "$work/server.csr" 2>/dev/null
cat > "$work/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
openssl x509 -req -sha256 -days "$days" -in "$work/server.csr" \
  -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -CAserial "$work/ca.srl" \
  -extfile "$work/server.ext" -out "$out/server.pem" 2>/dev/null

# SuperNode authentication keys (the SuperLink is told the public ones with
# `flwr supernode register <name>.pub <connection>`).
for node in $supernodes; do
  key="$out/supernode-$node.key"
  if [ -e "$key" ]; then
    echo "generate.sh: $key exists; keeping it" >&2
    continue
  fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "rebasin-fl supernode-$node" -f "$key"
  mv "$key.pub" "$out/supernode-$node.pub"
done

chmod 644 "$out/ca.crt" "$out/server.pem" "$out/server.key" "$out"/supernode-*.key \
  "$out"/supernode-*.pub
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "certificates and keys written to $out"
