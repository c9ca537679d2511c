#!/usr/bin/env bash
# Test certificates for the connection interop tests, made with the openssl CLI.
#
#   bash tests/interop/certs.sh DIR
#
# Writes into DIR (created if missing), all PEM:
#   ca.pem ca.key               the private CA the brokers' certificates chain to
#   other-ca.pem other-ca.key   a second CA nobody uses: trusting it = "unknown CA"
#   server.pem server.key       CN/SAN localhost (DNS:localhost, IP:127.0.0.1), signed by ca
#   wrong.pem wrong.key         CN/SAN wrong.example, signed by ca: right CA, wrong name
#   expired.pem expired.key     CN/SAN localhost, signed by ca, expired in 2020
#   client-ec.pem               client certificate (EC P-256), signed by ca, with its key as
#     client-ec.pkcs8.key         PKCS#8      (BEGIN PRIVATE KEY)
#     client-ec.sec1.key          SEC1        (BEGIN EC PRIVATE KEY)
#   client-rsa.pem              client certificate (RSA 2048), signed by ca, with its key as
#     client-rsa.pkcs8.key        PKCS#8      (BEGIN PRIVATE KEY)
#     client-rsa.pkcs1.key        traditional (BEGIN RSA PRIVATE KEY)
# Keys are readable by the owner only. Quiet unless openssl fails (then exit 1).
set -euo pipefail

DIR=${1:?usage: certs.sh DIR}
mkdir -p "$DIR"
cd "$DIR"
umask 077

log=openssl.log
: >"$log"
ossl() {
    if ! openssl "$@" >>"$log" 2>&1; then
        echo "certs.sh: openssl $* failed:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
}

ec_key() { ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# CA: self-signed, v3, CA:TRUE (webpki refuses a v1 or non-CA issuer).
make_ca() { # make_ca NAME CN
    ec_key "$1.key"
    ossl req -x509 -new -key "$1.key" -sha256 -days 3650 -subj "/CN=$2" -out "$1.pem" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
}

# sign NAME CN EXT...: a CSR from NAME.key signed by ca into NAME.pem, with the extensions.
sign() {
    local name=$1 cn=$2
    shift 2
    printf '%s\n' "$@" >"$name.ext"
    ossl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
    ossl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
        -days 825 -extfile "$name.ext" -out "$name.pem"
    rm -f "$name.csr" "$name.ext"
}

server_ext() { # server_ext SAN
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth"
    echo "subjectAltName=$1"
}
client_ext=("basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment"
    "extendedKeyUsage=clientAuth")

make_ca ca "twinbus interop CA"
make_ca other-ca "twinbus interop OTHER CA"

ec_key server.key
mapfile -t ext < <(server_ext "DNS:localhost,IP:127.0.0.1")
sign server localhost "${ext[@]}"

ec_key wrong.key
mapfile -t ext < <(server_ext "DNS:wrong.example")
sign wrong wrong.example "${ext[@]}"

# Expired: openssl 3.0's `x509 -req` has no start date option; `ca` does.
ec_key expired.key
mkdir -p ca-db
: >ca-db/index.txt
cat >ca-db/ca.cnf <<'EOF'
[ca]
default_ca = d
[d]
database = ca-db/index.txt
new_certs_dir = ca-db
serial = ca-db/serial
default_md = sha256
policy = p
copy_extensions = none
unique_subject = no
[p]
commonName = supplied
[x]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
EOF
echo 1000 >ca-db/serial
ossl req -new -key expired.key -subj "/CN=localhost" -out expired.csr
ossl ca -batch -config ca-db/ca.cnf -cert ca.pem -keyfile ca.key -extensions x \
    -startdate 20190101000000Z -enddate 20200101000000Z -in expired.csr -out expired.pem -notext
rm -rf expired.csr ca-db

# Client certificates. genpkey writes PKCS#8; the traditional forms are converted from it.
ec_key client-ec.pkcs8.key
ossl ec -in client-ec.pkcs8.key -out client-ec.sec1.key
cp client-ec.pkcs8.key client-ec.key
sign client-ec twinbus-client-ec "${client_ext[@]}"
rm client-ec.key

ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out client-rsa.pkcs8.key
ossl rsa -in client-rsa.pkcs8.key -traditional -out client-rsa.pkcs1.key
cp client-rsa.pkcs8.key client-rsa.key
sign client-rsa twinbus-client-rsa "${client_ext[@]}"
rm client-rsa.key

# The PEM labels are the point of the key variants: make sure each is what its name says.
for f in client-ec.pkcs8.key:"BEGIN PRIVATE KEY" client-ec.sec1.key:"BEGIN EC PRIVATE KEY" \
    client-rsa.pkcs8.key:"BEGIN PRIVATE KEY" client-rsa.pkcs1.key:"BEGIN RSA PRIVATE KEY"; do
    grep -q -- "-----${f#*:}-----" "${f%%:*}" || { echo "certs.sh: ${f%%:*} is not ${f#*:}" >&2; exit 1; }
done
for c in server wrong client-ec client-rsa expired; do
    ossl verify -CAfile ca.pem -purpose any -no_check_time "$c.pem"
done
rm -f "$log" ca.srl
