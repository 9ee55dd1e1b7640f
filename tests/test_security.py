"""TLS on every hop, mutual TLS between the orchestrator and its services, and a bearer token on
Generate. The certificates come from a CA made in the test (openssl)."""

from __future__ import annotations

import subprocess

import grpc
import pytest

from specdec.serving.security import UNAUTHENTICATED_MESSAGE, server_credentials
from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2, session_pb2_grpc
from tests.servers import start_model_service, start_orchestrator
from tests.tiny import greedy_reference

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name: str) -> None:
    openssl("req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip


def issue(directory, name: str, ca: str) -> None:
    """name.pem / name.key for localhost and 127.0.0.1, signed by ca, for servers and clients."""
    (directory / f"{name}.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")  # a CA nobody here trusts
    for name in ("server", "orchestrator"):
        issue(directory, name, "ca")
    issue(directory, "stranger", "other-ca")
    (directory / "token").write_text("s3cret-token\n")
    return directory


@pytest.fixture(scope="module")
def secure_stack(pki, loop, engines, model_dirs):
    """Services that serve TLS and require the orchestrator's certificate (mTLS); an orchestrator
    serving TLS and requiring a token."""
    mtls = server_credentials(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    target = start_model_service(loop, "target", engines["target"], credentials=mtls)
    draft = start_model_service(loop, "draft", engines["layer_skip"], credentials=mtls)
    orchestrator = start_orchestrator(
        loop, target.address, draft.address, str(model_dirs["target"]),
        "--tls-ca", str(pki / "ca.pem"), "--tls-client-cert", str(pki / "orchestrator.pem"),
        "--tls-client-key", str(pki / "orchestrator.key"), "--tls-cert", str(pki / "server.pem"),
        "--tls-key", str(pki / "server.key"), "--auth-token-file", str(pki / "token"),
    )  # fmt: skip
    yield {"target": target, "draft": draft, "orchestrator": orchestrator}
    for running in (orchestrator, target, draft):
        loop.run(running.server.stop(0))
        running.servicer.close()


def tls_channel(pki, address: str, ca: str = "ca", client: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        (pki / f"{ca}.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None,
    )
    return grpc.secure_channel(address, credentials)


REQUEST = generate_pb2.GenerateRequest(prompt_token_ids=[3, 1, 4], max_tokens=10, ignore_eos=True)


def generate(channel, token: str | None):
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    return list(generate_pb2_grpc.GeneratorStub(channel).Generate(REQUEST, timeout=30, metadata=metadata))


def test_tls_end_to_end_with_mutual_tls_to_the_services(pki, secure_stack, engines):
    with tls_channel(pki, secure_stack["orchestrator"].address) as channel:
        responses = generate(channel, "s3cret-token")
    assert [t for r in responses for t in r.token_ids] == greedy_reference(engines["target"], [3, 1, 4], 10)
    assert responses[-1].stats.draft_tokens > 0  # the draft hop ran over mTLS too


@pytest.mark.parametrize("token", [None, "wrong", "s3cret-token-but-longer", ""])
def test_a_missing_or_wrong_token_gets_unauthenticated_and_nothing_more(pki, secure_stack, token):
    with tls_channel(pki, secure_stack["orchestrator"].address) as channel, pytest.raises(grpc.RpcError) as e:
        generate(channel, token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == UNAUTHENTICATED_MESSAGE  # the same whatever was wrong


def test_without_the_token_even_garbage_gets_unauthenticated(pki, secure_stack):
    with tls_channel(pki, secure_stack["orchestrator"].address) as channel, pytest.raises(grpc.RpcError) as e:
        list(channel.unary_stream("/specdec.v1.Generator/Generate")(b"\xff\xff\xff\xff", timeout=10))
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def test_health_needs_no_token(pki, secure_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tls_channel(pki, secure_stack["orchestrator"].address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "role, ca, client",
    [
        ("orchestrator", "other-ca", None),  # the client does not trust the server's CA
        ("target", "ca", None),  # no client certificate: the service requires one
        ("draft", "ca", "stranger"),  # a client certificate from a CA the service does not trust
        ("orchestrator", None, None),  # plaintext to a TLS server
    ],
)
def test_a_failed_handshake_is_unavailable(pki, secure_stack, role, ca, client):
    address = secure_stack[role].address
    channel = grpc.insecure_channel(address) if ca is None else tls_channel(pki, address, ca, client)
    with channel, pytest.raises(grpc.RpcError) as e:
        if role == "orchestrator":
            generate(channel, "s3cret-token")
        else:
            stub_type = session_pb2_grpc.TargetServiceStub if role == "target" else session_pb2_grpc.DraftServiceStub
            stub_type(channel).GetInfo(session_pb2.GetInfoRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_with_the_orchestrator_s_certificate_a_service_answers(pki, secure_stack):
    with tls_channel(pki, secure_stack["target"].address, client="orchestrator") as channel:
        info = session_pb2_grpc.TargetServiceStub(channel).GetInfo(session_pb2.GetInfoRequest(), timeout=10)
    assert info.role == "target"


@pytest.mark.parametrize(
    "cert, key, ca, message",
    [
        ("server.pem", "", "", "--tls-cert and --tls-key go together"),
        ("", "", "ca.pem", "--tls-client-ca needs --tls-cert and --tls-key"),
        ("missing.pem", "server.key", "", "--tls-cert"),
    ],
)
def test_tls_flags_that_cannot_work_are_refused_saying_why(pki, cert, key, ca, message):
    path = lambda name: str(pki / name) if name else ""  # noqa: E731
    with pytest.raises(ValueError, match=message):
        server_credentials(path(cert), path(key), path(ca))


def test_a_service_process_serves_mtls_from_its_flags_and_the_health_check_speaks_it(pki, model_dirs):
    import sys

    from tests.test_commands import Process

    def check(*args: str) -> int:
        return subprocess.run([sys.executable, "-m", "specdec.healthcheck", *args], timeout=60).returncode

    target = Process(["-m", "target_service", "--model", str(model_dirs["target"]), "--dtype", "float64",
                      "--host", "127.0.0.1", "--port", "0", "--tls-cert", str(pki / "server.pem"),
                      "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem")])  # fmt: skip
    try:
        address = target.wait_ready()
        assert any("(TLS)" in line for line in target.lines)
        client = ["--tls-client-cert", str(pki / "orchestrator.pem"), "--tls-client-key", str(pki / "orchestrator.key")]
        assert check(address, "specdec.v1.TargetService", "--tls-ca", str(pki / "ca.pem"), *client) == 0
        assert check(address, "--tls-ca", str(pki / "ca.pem")) == 1  # no client certificate
        assert check(address) == 1  # plaintext
    finally:
        assert target.stop() == 0


def test_the_client_command_speaks_tls_and_sends_the_token(pki, secure_stack, capsys):
    from specdec import client

    address = secure_stack["orchestrator"].address
    common = ["w1 w2 w3", "--server", address, "--no-chat", "--max-tokens", "4", "--tls-ca", str(pki / "ca.pem")]
    assert client.main([*common, "--token-file", str(pki / "token")]) == 0
    assert "[FINISH_REASON_LENGTH] 4 tokens" in capsys.readouterr().err  # the summary; the text is on stdout
    (pki / "wrong-token").write_text("nope\n")
    assert client.main([*common, "--token-file", str(pki / "wrong-token")]) == 1
    assert f"UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}" in capsys.readouterr().err
