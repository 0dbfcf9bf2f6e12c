"""The control plane's entry-point settings that are checked before serving."""

from __future__ import annotations

import pytest

from meshgate.common.testing import write_test_pki
from meshgate.controlplane.main import ControlPlaneConfig, keyservice_credentials


def test_plaintext_key_service_link_by_default():
    assert keyservice_credentials(ControlPlaneConfig()) is None


@pytest.mark.parametrize("fields, message", [
    ({"keyservice_cert": "c.pem", "keyservice_key": "k.pem"}, "need --keyservice-ca"),
    ({"keyservice_ca": "CA", "keyservice_cert": "c.pem"}, "go together"),
    ({"keyservice_ca": "/nonexistent/ca.pem"}, "cannot read the key service CA"),
])
def test_bad_key_service_tls_settings_are_clear_exits(fields, message, tmp_path):
    pki = write_test_pki(tmp_path)
    fields = {k: pki["ca.pem"] if v == "CA" else v for k, v in fields.items()}
    with pytest.raises(SystemExit) as ei:
        keyservice_credentials(ControlPlaneConfig(**fields))
    assert message in str(ei.value.code)


def test_key_service_tls_credentials(tmp_path):
    pki = write_test_pki(tmp_path)
    cfg = ControlPlaneConfig(keyservice_ca=pki["ca.pem"], keyservice_cert=pki["cli.pem"], keyservice_key=pki["cli.key"])
    assert keyservice_credentials(cfg) is not None
