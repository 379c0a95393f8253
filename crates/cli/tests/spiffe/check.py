"""Checks Bulkhead's SPIFFE surfaces with the SPIFFE project's own Python client (py-spiffe).

Run by crates/cli/tests/e2e/spiffe.rs against real processes; prints one JSON object on
success, exits non-zero with the reason otherwise.

  check.py workload-api SOCKET --id SPIFFE_ID --ca-pem PATH --sidecar-credential PATH [--rotations N]
  check.py bundle DOCUMENT --trust-domain TD --ca-pem PATH [--endpoint https://HOST:PORT/]
  check.py jwt-federated --fetch-socket A --validate-socket B --id SPIFFE_ID --audience AUD
  check.py federated SOCKET --trust-domain TD --ca-pem PATH --federated-domain TD --federated-ca-pem PATH
"""

import argparse
import base64
import json
import socket
import ssl
import sys
import threading
import time
import urllib.parse

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spiffe import WorkloadApiClient, X509Bundle, TrustDomain, SpiffeId, JwtBundle
from spiffe._proto import workload_pb2, workload_pb2_grpc


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def public_der(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def roots_of(ca_pem_path, td):
    with open(ca_pem_path, "rb") as f:
        bundle = X509Bundle.parse(TrustDomain(td), f.read())
    return {c.fingerprint(c.signature_hash_algorithm).hex() for c in bundle.x509_authorities}


def fingerprints(certs):
    return {c.fingerprint(c.signature_hash_algorithm).hex() for c in certs}


def check_svid(svid, expected_id, sidecar_public):
    if str(svid.spiffe_id) != expected_id:
        fail(f"SPIFFE ID {svid.spiffe_id}, expected {expected_id}")
    leaf = svid.leaf
    if public_der(leaf.public_key()) != public_der(svid.private_key.public_key()):
        fail("the private key does not match the leaf certificate")
    if public_der(svid.private_key.public_key()) == sidecar_public:
        fail("the app was given the sidecar's own key")
    return leaf.serial_number


def stream_until(client, on_context, errors):
    """Reads the FetchX509SVID stream, handing each context to on_context, until it returns
    true, the stream fails (its error appended to errors) or 60 s pass. Returns whether it
    ended before the 60 s."""
    done = threading.Event()

    def on_success(ctx):
        if on_context(ctx):
            done.set()

    def on_error(e):
        errors.append(str(e))
        done.set()

    handler = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
    done.wait(timeout=60)
    handler.cancel()
    return done.is_set()


def workload_api(args):
    target = "unix:" + args.socket
    with open(args.sidecar_credential, "rb") as f:
        text = f.read()
    key_pem = text[text.index(b"-----BEGIN PRIVATE KEY-----"):]
    key_pem = key_pem[: key_pem.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----")]
    sidecar_public = public_der(serialization.load_pem_private_key(key_pem, None).public_key())
    td = args.id.split("/")[2]

    # Without the security header the call is refused with INVALID_ARGUMENT.
    with grpc.insecure_channel(target) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        try:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10))
            fail("a call without workload.spiffe.io: true was answered")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                fail(f"a call without the header got {e.code()}, not INVALID_ARGUMENT: {e.details()}")
            refused = e.details()

    client = WorkloadApiClient(socket_path=target, default_timeout=20)
    svid = client.fetch_x509_svid()
    first_serial = check_svid(svid, args.id, sidecar_public)
    bundles = client.fetch_x509_bundles()
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(td))
    if bundle is None:
        fail(f"no bundle for {td}")
    if fingerprints(bundle.x509_authorities) != roots_of(args.ca_pem, td):
        fail("the bundle's authorities are not the roots of ca.pem")
    context = client.fetch_x509_context()
    if fingerprints(context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(td)).x509_authorities) != roots_of(args.ca_pem, td):
        fail("the SVID's bundle is not the roots of ca.pem")

    # A JWT-SVID for the sidecar's identity and the asked audience, signed by a key of the
    # JWT bundle (a JWK Set with kid and use jwt-svid), valid for that audience only.
    jwt_svid = client.fetch_jwt_svid(audience={"payments"})
    if str(jwt_svid.spiffe_id) != args.id:
        fail(f"the JWT-SVID is for {jwt_svid.spiffe_id}, not {args.id}")
    if set(jwt_svid.audience) != {"payments"}:
        fail(f"the JWT-SVID's audience is {jwt_svid.audience}")
    lifetime = jwt_svid.expiry - time.time()
    if not 0 < lifetime <= 300:
        fail(f"the JWT-SVID lives {lifetime} s")
    header = json.loads(base64.urlsafe_b64decode(jwt_svid.token.split(".")[0] + "=="))
    if header.get("alg") != "ES256" or not header.get("kid"):
        fail(f"the JWT-SVID's header is {header}")
    jwt_bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain(td))
    if jwt_bundle is None or jwt_bundle.get_jwt_authority(header["kid"]) is None:
        fail("the JWT bundle has no key for the token's kid")
    from spiffe import JwtSvid
    checked = JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {"payments"})
    if str(checked.spiffe_id) != args.id:
        fail(f"py-spiffe validated {checked.spiffe_id}")
    try:
        JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {"orders"})
        fail("py-spiffe accepted the JWT-SVID for another audience")
    except SystemExit:
        raise
    except Exception:
        pass
    validated = client.validate_jwt_svid(jwt_svid.token, "payments")
    if str(validated.spiffe_id) != args.id:
        fail(f"ValidateJWTSVID said {validated.spiffe_id}")
    try:
        client.validate_jwt_svid(jwt_svid.token, "orders")
        fail("ValidateJWTSVID accepted another audience")
    except SystemExit:
        raise
    except Exception as e:
        jwt_wrong_audience = str(e)
    try:
        client.fetch_jwt_svid(audience={"payments"}, subject=SpiffeId(f"spiffe://{td}/ns/shop/sa/other"))
        fail("FetchJWTSVID signed for another identity")
    except SystemExit:
        raise
    except Exception:
        pass

    # Rotation: the open stream delivers each renewed SVID, each with a new key of its own.
    serials = []
    keys = set()
    errors = []

    def on_context(ctx):
        try:
            s = ctx.default_svid
            serial = check_svid(s, args.id, sidecar_public)
            if not serials or serials[-1] != serial:
                serials.append(serial)
                keys.add(public_der(s.private_key.public_key()))
            return len(serials) > args.rotations
        except SystemExit:
            errors.append("bad SVID on the stream")
            return True

    stream_until(client, on_context, errors)
    client.close()
    if errors:
        fail(f"stream error: {errors}")
    if len(serials) <= args.rotations:
        fail(f"saw {len(serials)} SVIDs on the stream in 60 s, wanted {args.rotations + 1}")
    if len(keys) != len(serials):
        fail("a renewed SVID reused a key")
    print(json.dumps({
        "spiffe_id": str(svid.spiffe_id),
        "first_serial": str(first_serial),
        "stream_serials": [str(s) for s in serials],
        "refused_without_header": refused,
        "jwt_kid": header["kid"],
        "jwt_wrong_audience": jwt_wrong_audience,
    }))


def watch_bundle(args):
    """Waits on an open FetchX509SVID stream until the trust domain's bundle holds
    --roots roots (another CA added while the stream is open), and on FetchX509Bundles."""
    td = TrustDomain(args.trust_domain)
    client = WorkloadApiClient(socket_path="unix:" + args.socket, default_timeout=20)
    first = client.fetch_x509_bundles().get_bundle_for_trust_domain(td)
    print(f"ready {len(first.x509_authorities)}", flush=True)
    seen = []

    def on_context(ctx):
        n = len(ctx.x509_bundle_set.get_bundle_for_trust_domain(td).x509_authorities)
        seen.append(n)
        return n == args.roots

    done = stream_until(client, on_context, seen)
    if not done or seen[-1] != args.roots:
        fail(f"the stream never carried {args.roots} roots: {seen}")
    # A new FetchX509Bundles call has them too.
    now = client.fetch_x509_bundles().get_bundle_for_trust_domain(td)
    if len(now.x509_authorities) != args.roots:
        fail(f"FetchX509Bundles has {len(now.x509_authorities)} roots")
    client.close()
    print(json.dumps({"roots_seen": seen}))


def fetch_endpoint(url, ca_pem, td):
    """GET the bundle endpoint the https_spiffe way: the chain must verify against the trust
    domain's roots and the server must present spiffe://TD/bulkhead/bundle-endpoint (no
    host-name check: the SPIFFE ID is what is authenticated)."""
    parsed = urllib.parse.urlparse(url)
    ctx = ssl.create_default_context(cafile=ca_pem)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier
            )
            if uris != [f"spiffe://{td}/bulkhead/bundle-endpoint"]:
                fail(f"the bundle endpoint presented {uris}")
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {parsed.hostname}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        fail(f"the bundle endpoint answered {head[:40]!r}")
    if b"content-type: application/json" not in head.lower():
        fail("the bundle endpoint's content type is not application/json")
    return body


def bundle(args):
    with open(args.document, "rb") as f:
        text = f.read()
    doc = json.loads(text)
    if not isinstance(doc.get("spiffe_sequence"), int) or doc["spiffe_sequence"] < 1:
        fail(f"spiffe_sequence: {doc.get('spiffe_sequence')!r}")
    if not isinstance(doc.get("spiffe_refresh_hint"), int) or doc["spiffe_refresh_hint"] < 1:
        fail(f"spiffe_refresh_hint: {doc.get('spiffe_refresh_hint')!r}")
    ders = []
    jwt_keys = [k for k in doc["keys"] if k.get("use") == "jwt-svid"]
    for key in jwt_keys:
        if not key.get("kid") or key.get("kty") != "EC" or key.get("crv") != "P-256":
            fail(f"a jwt-svid key without a kid or not EC P-256: {key}")
    jwt_bundle = JwtBundle.parse(TrustDomain(args.trust_domain), json.dumps({"keys": jwt_keys}).encode())
    if len(jwt_bundle.jwt_authorities) != 1:
        fail(f"{len(jwt_bundle.jwt_authorities)} JWT authorities, not 1")
    for key in doc["keys"]:
        if key.get("use") == "jwt-svid":
            continue
        if key.get("use") != "x509-svid":
            fail(f"a key with use {key.get('use')!r}")
        if "kid" in key:
            fail("an x509-svid key carries a kid")
        if len(key.get("x5c", [])) != 1:
            fail("an x509-svid key without exactly one x5c certificate")
        der = base64.b64decode(key["x5c"][0])
        cert = x509.load_der_x509_certificate(der)
        # The JWK's own parameters (kty/crv/x/y) are the certificate's public key.
        public = jwt.PyJWK(key).key
        if public_der(public) != public_der(cert.public_key()):
            fail("a key's parameters are not its certificate's public key")
        ders.append(der)
    parsed = X509Bundle.parse_raw(TrustDomain(args.trust_domain), b"".join(ders))
    if fingerprints(parsed.x509_authorities) != roots_of(args.ca_pem, args.trust_domain):
        fail("the SPIFFE bundle's roots are not those of ca.pem")
    served = None
    if args.endpoint:
        body = fetch_endpoint(args.endpoint, args.ca_pem, args.trust_domain)
        if json.loads(body) != doc:
            fail("the bundle endpoint serves another document than `ca bundle -o spiffe` prints")
        served = True
    print(json.dumps({
        "roots": len(ders),
        "jwt_keys": len(jwt_bundle.jwt_authorities),
        "sequence": doc["spiffe_sequence"],
        "kty": sorted({k["kty"] for k in doc["keys"]}),
        "served_same": served,
    }))


def federated(args):
    """FetchX509Bundles (and the X.509 context) carry our own trust domain's roots and a
    federated domain's, each exactly as its own control plane has them."""
    client = WorkloadApiClient(socket_path="unix:" + args.socket, default_timeout=20)
    seen = {}
    for name, bundle_set in [
        ("bundles", client.fetch_x509_bundles()),
        ("context", client.fetch_x509_context().x509_bundle_set),
    ]:
        for td, pem in [(args.trust_domain, args.ca_pem), (args.federated_domain, args.federated_ca_pem)]:
            bundle = bundle_set.get_bundle_for_trust_domain(TrustDomain(td))
            if bundle is None:
                fail(f"{name}: no bundle for {td}")
            got = fingerprints(bundle.x509_authorities)
            if got != roots_of(pem, td):
                fail(f"{name}: the bundle of {td} is {sorted(got)}, not the roots of {pem}")
            seen[f"{name}:{td}"] = len(got)
    client.close()
    print(json.dumps(seen))


def jwt_federated(args):
    """A JWT-SVID fetched from one trust domain's sidecar validates at a federated domain's
    sidecar (its JWT bundle fetched from the bundle endpoint), for its audience only."""
    issuer = WorkloadApiClient(socket_path="unix:" + args.fetch_socket, default_timeout=20)
    verifier = WorkloadApiClient(socket_path="unix:" + args.validate_socket, default_timeout=20)
    token = issuer.fetch_jwt_svid(audience={args.audience}).token
    td = TrustDomain(args.id.split("/")[2])
    bundle = verifier.fetch_jwt_bundles().get_bundle_for_trust_domain(td)
    if bundle is None or len(bundle.jwt_authorities) < args.kids:
        fail(f"the verifying sidecar has no JWT bundle of {args.kids} keys for {td}")
    from spiffe import JwtSvid
    if str(JwtSvid.parse_and_validate(token, bundle, {args.audience}).spiffe_id) != args.id:
        fail("py-spiffe validated another identity")
    if str(verifier.validate_jwt_svid(token, args.audience).spiffe_id) != args.id:
        fail("ValidateJWTSVID said another identity")
    try:
        verifier.validate_jwt_svid(token, args.audience + "-other")
        fail("ValidateJWTSVID accepted another audience")
    except SystemExit:
        raise
    except Exception:
        pass
    issuer.close()
    verifier.close()
    print(json.dumps({"validated": args.id}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("workload-api")
    w.add_argument("socket")
    w.add_argument("--id", required=True)
    w.add_argument("--ca-pem", required=True)
    w.add_argument("--sidecar-credential", required=True)
    w.add_argument("--rotations", type=int, default=1)
    wb = sub.add_parser("watch-bundle")
    wb.add_argument("socket")
    wb.add_argument("--trust-domain", required=True)
    wb.add_argument("--roots", type=int, required=True)
    b = sub.add_parser("bundle")
    b.add_argument("document")
    b.add_argument("--trust-domain", required=True)
    b.add_argument("--ca-pem", required=True)
    b.add_argument("--endpoint")
    f = sub.add_parser("federated")
    f.add_argument("socket")
    f.add_argument("--trust-domain", required=True)
    f.add_argument("--ca-pem", required=True)
    f.add_argument("--federated-domain", required=True)
    f.add_argument("--federated-ca-pem", required=True)
    j = sub.add_parser("jwt-federated")
    j.add_argument("--fetch-socket", required=True)
    j.add_argument("--validate-socket", required=True)
    j.add_argument("--id", required=True)
    j.add_argument("--audience", required=True)
    j.add_argument("--kids", type=int, default=1)
    args = parser.parse_args()
    {
        "jwt-federated": jwt_federated,
        "workload-api": workload_api,
        "bundle": bundle,
        "watch-bundle": watch_bundle,
        "federated": federated,
    }[args.command](args)


if __name__ == "__main__":
    main()
