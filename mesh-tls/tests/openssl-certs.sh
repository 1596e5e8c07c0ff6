#!/bin/sh
# Makes X.509-SVIDs with openssl (not with mesh-tls's own helper), good and bad, in $1:
#   ca.pem/ca.key          CA of trust domain cluster.local
#   other-ca.pem           CA of trust domain other.org
#   server, client         good SVIDs (server also has DNS:localhost and IP:127.0.0.1 SANs)
#   other                  good SVID of cluster.local for another service account
#   intruder               good SVID of other.org, signed by other-ca
#   foreign                spiffe://other.org/... signed by ca (wrong trust domain for the bundle)
#   expired                good SVID that expired in 2021
#   ca-leaf                a CA certificate (cA=TRUE, keyCertSign) with a workload URI SAN
#   two-uris               a leaf with two URI SANs
set -eu
d=$1
mkdir -p "$d"
cd "$d"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
ca() { # name trust-domain
    key "$1"
    openssl req -x509 -new -key "$1.key" -out "$1.pem" -days 3650 -subj "/O=openssl-test/CN=$1" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectAltName=URI:spiffe://$2" -addext "subjectKeyIdentifier=hash"
}
ext() { # section name, SAN, basic constraints, key usage
    printf '[%s]\nbasicConstraints=critical,%s\nkeyUsage=critical,%s\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,%s\nauthorityKeyIdentifier=keyid\n' \
        leaf "$3" "$4" "$2" > "$1.ext"
}
leaf() { # name ca san [basic] [usage]
    key "$1"
    openssl req -new -key "$1.key" -out "$1.csr" -subj "/O=openssl-test/CN=$1"
    ext "$1" "$3" "${4:-CA:FALSE}" "${5:-digitalSignature,keyEncipherment}"
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 365 \
        -out "$1.pem" -extfile "$1.ext" -extensions leaf 2>/dev/null
}
ca ca cluster.local
ca other-ca other.org
leaf server ca "URI:spiffe://cluster.local/ns/default/sa/server,DNS:localhost,IP:127.0.0.1"
leaf client ca "URI:spiffe://cluster.local/ns/default/sa/client"
leaf other ca "URI:spiffe://cluster.local/ns/default/sa/other"
leaf intruder other-ca "URI:spiffe://other.org/ns/default/sa/client"
leaf foreign ca "URI:spiffe://other.org/ns/default/sa/client"
leaf ca-leaf ca "URI:spiffe://cluster.local/ns/default/sa/client" "CA:TRUE" "keyCertSign,cRLSign,digitalSignature"
leaf two-uris ca "URI:spiffe://cluster.local/ns/default/sa/client,URI:spiffe://cluster.local/ns/default/sa/admin"
# An expired one needs explicit dates: `openssl ca` takes them.
key expired
openssl req -new -key expired.key -out expired.csr -subj "/O=openssl-test/CN=expired"
ext expired "URI:spiffe://cluster.local/ns/default/sa/client" "CA:FALSE" "digitalSignature,keyEncipherment"
: > index.txt
echo 1000 > serial
cat > ca.cnf <<CNF
[ca]
default_ca = dflt
[dflt]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
[any]
commonName = supplied
organizationName = optional
CNF
openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr -out expired.pem \
    -startdate 20200101000000Z -enddate 20210101000000Z -extfile expired.ext -extensions leaf -notext 2>/dev/null
