"""Authentication and policy decisions as plain functions (identity.md 2-4)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest

from vmpool.auth.authenticator import Authenticator, is_loopback
from vmpool.auth.cache import TokenCache, cache_until
from vmpool.auth.kubernetes import principal_of_review
from vmpool.auth.mtls import identity_of
from vmpool.auth.oidc import claims_principal
from vmpool.auth.policy import glob_allows, grant_for, subject_matches
from vmpool.auth.principal import ANONYMOUS, AuthUnavailable, Principal, Unauthenticated
from vmpool.auth.tokens import bearer_token
from vmpool.config.loading import parse_config


def test_bearer_token_from_the_header_or_the_auth_proxy_cookie() -> None:
    assert bearer_token([("authorization", "Bearer abc.def")]) == "abc.def"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("cookie", "org-id=7; auth-proxy=eyJ.x.y")]) == "eyJ.x.y"
    assert bearer_token([("cookie", "org-id=7")]) is None
    assert bearer_token([]) is None
    # The header wins over the cookie.
    got = bearer_token([("cookie", "auth-proxy=c"), ("authorization", "Bearer h")])
    assert got == "h"


def test_a_kilobyte_token_of_every_printable_character_is_taken_whole() -> None:
    token = "".join(chr(c) for c in range(ord("!"), ord("~") + 1)) * 10
    assert bearer_token([("authorization", f"Bearer {token}")]) == token


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Basic dXNlcg==")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer a"), ("authorization", "Bearer b")],
        [("authorization", "Bearer " + "a" * 20000)],
        [("authorization", "Bearer caf\u00e9")],
        [("authorization", "Bearer a\x01b")],
        [("authorization", "Bearer a\x7fb")],
        [("authorization", "Bearer a\tb")],
        [("cookie", "auth-proxy=a b")],
        [("cookie", "auth-proxy=")],
    ],
)
def test_malformed_credentials_are_unauthenticated(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(Unauthenticated):
        bearer_token(headers)


def test_mtls_identity_prefers_uri_then_dns_then_cn() -> None:
    cn = {"subject": ((("commonName", "ci-runner"),),)}
    dns = {**cn, "subjectAltName": (("DNS", "ci.team-a.svc"),)}
    uri = {**cn, "subjectAltName": (("DNS", "x"), ("URI", "spiffe://c/ns/a/sa/ci"))}
    assert identity_of(uri).name == "spiffe://c/ns/a/sa/ci"
    assert identity_of(dns).name == "ci.team-a.svc"
    assert identity_of(cn).name == "ci-runner"
    for missing in (None, {}, {"subject": ()}):
        with pytest.raises(Unauthenticated):
            identity_of(missing)


def test_token_review_status_to_principal() -> None:
    user = SimpleNamespace(username="system:serviceaccount:a:ci", groups=["system:serviceaccounts"])
    ok = SimpleNamespace(authenticated=True, user=user, audiences=["vmpool"], error=None)
    assert principal_of_review(ok, ["vmpool"]) == Principal(
        "system:serviceaccount:a:ci", ("system:serviceaccounts",)
    )
    with pytest.raises(Unauthenticated, match="audience"):
        principal_of_review(SimpleNamespace(**{**vars(ok), "audiences": ["other"]}), ["vmpool"])
    with pytest.raises(Unauthenticated, match="expired"):
        principal_of_review(
            SimpleNamespace(authenticated=False, user=None, audiences=None, error="token expired"),
            ["vmpool"],
        )


def test_jwt_claims_to_principal() -> None:
    assert claims_principal({"sub": "u1", "groups": ["g"]}, "sub", "groups") == Principal(
        "u1", ("g",)
    )
    assert claims_principal({"email": "a@b", "groups": "g"}, "email", "groups").groups == ("g",)
    with pytest.raises(Unauthenticated):
        claims_principal({"groups": []}, "sub", "groups")


def test_cache_never_outlives_the_token() -> None:
    assert cache_until(100.0, 60.0, 1000.0, None) == 160.0
    assert cache_until(100.0, 60.0, 1000.0, 1010.0) == 110.0
    cache = TokenCache(max_entries=2)
    cache.put("t1", ANONYMOUS, 110.0, 100.0)
    assert cache.get("t1", 109.0) is ANONYMOUS
    assert cache.get("t1", 110.0) is None
    for i in range(5):
        cache.put(f"x{i}", ANONYMOUS, 200.0, 100.0)
    assert len(cache) == 2


def test_globs_and_the_empty_tag() -> None:
    assert glob_allows(["ci-*", ""], "")
    assert glob_allows(["ci-*", ""], "ci-7")
    assert not glob_allows(["ci-*"], "")
    assert not glob_allows(["ci-*"], "prod")
    assert glob_allows(["*"], "")


def test_subjects() -> None:
    p = Principal("system:serviceaccount:team-a:ci", ("vmpool-admins",))
    assert subject_matches("system:serviceaccount:team-a:ci", p)
    assert subject_matches("system:serviceaccount:team-a:*", p)
    assert subject_matches("group:vmpool-admins", p)
    assert not subject_matches("group:others", p)
    assert not subject_matches("system:serviceaccount:team-b:*", p)


POLICY = parse_config(
    {
        "auth": {
            "mode": "mtls",
            "policy": [
                {
                    "subject": "ci",
                    "roles": ["lease"],
                    "service_tags": ["ci-*"],
                    "max_queued_reservations": 5,
                },
                {"subject": "group:ops", "roles": ["admin"]},
            ],
            "default": {"roles": ["lease"], "pools": ["small"]},
        },
        "tls": {"cert_file": "c", "key_file": "k", "client_ca_file": "ca"},
        "limits": {"max_queued_reservations": 50, "max_active_leases": 3},
    }
)


def test_first_matching_entry_wins_and_limits_fall_back() -> None:
    auth, limits = POLICY.auth, POLICY.limits
    ci = grant_for(Principal("ci", ("ops",)), auth, limits, loopback=False)
    assert ci.subject == "ci" and ci.roles == {"lease"}
    assert (ci.max_queued_reservations, ci.max_active_leases) == (5, 3)
    ops = grant_for(Principal("eve", ("ops",)), auth, limits, loopback=False)
    assert ops.roles == {"admin"}
    other = grant_for(Principal("bob"), auth, limits, loopback=True)
    assert other.subject == "default" and other.pools == ("small",)
    assert other.max_queued_reservations == 50


def test_anonymous_gets_admin_only_from_loopback_unless_allowed() -> None:
    cfg = parse_config({})
    assert "admin" in grant_for(ANONYMOUS, cfg.auth, cfg.limits, loopback=True).roles
    assert "admin" not in grant_for(ANONYMOUS, cfg.auth, cfg.limits, loopback=False).roles
    allowed = parse_config({"auth": {"allow_anonymous_admin": True}})
    assert "admin" in grant_for(ANONYMOUS, allowed.auth, allowed.limits, loopback=False).roles
    assert grant_for(ANONYMOUS, cfg.auth, cfg.limits, loopback=False).max_queued_reservations == 100


def test_loopback_peers() -> None:
    assert is_loopback(("127.0.0.1", 5))
    assert is_loopback(("::1", 5, 0, 0))
    assert not is_loopback(("10.0.0.1", 5))
    assert not is_loopback(None)


async def test_mode_none_is_anonymous_and_owner_is_the_tag() -> None:
    caller = await Authenticator(parse_config({})).authenticate([], ("10.1.2.3", 1), None)
    assert caller.principal is ANONYMOUS
    assert caller.owner("team-a") == "team-a"
    assert "admin" not in caller.grant.roles


async def test_mode_mtls_needs_a_certificate() -> None:
    auth = Authenticator(POLICY)
    with pytest.raises(Unauthenticated):
        await auth.authenticate([], ("127.0.0.1", 1), None)
    who = await auth.authenticate([], None, {"subject": ((("commonName", "ci"),),)})
    assert who.owner("ci-1") == "ci"


async def test_each_principal_gets_its_policy_entry_on_every_call() -> None:
    """The Caller is kept per principal and peer kind: the same grant each call,
    another principal (or groups, or a loopback peer) its own."""
    auth = Authenticator(POLICY)

    def cert(cn: str) -> dict[str, Any]:
        return {"subject": (((("commonName", cn),),))}

    ci = await auth.authenticate([], ("10.0.0.1", 1), cert("ci"))
    assert await auth.authenticate([], ("10.0.0.2", 2), cert("ci")) is ci
    assert ci.grant == grant_for(Principal("ci"), POLICY.auth, POLICY.limits, loopback=False)
    bob = await auth.authenticate([], ("10.0.0.1", 1), cert("bob"))
    assert bob.principal.name == "bob" and bob.grant.subject == "default"
    local = await auth.authenticate([], ("127.0.0.1", 1), cert("ci"))
    assert local.principal == ci.principal and local is not ci


async def test_jwt_keys_are_fetched_again_for_an_unknown_kid(tmp_path: Path) -> None:
    from tests.e2e.identity_kit import Issuer
    from vmpool.auth.oidc import REFRESH_GAP, JwtVerifier
    from vmpool.config.schema import JwtAuthConfig

    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    now = [1000.0]
    verifier = JwtVerifier(
        JwtAuthConfig(issuer=issuer.url, audiences=["vmpool"], jwks_file=str(jwks)),
        mono=lambda: now[0],
    )
    assert (await verifier.authenticate(issuer.token("a", groups=("g",)))).groups == ("g",)
    issuer.rotate()
    jwks.write_text(json.dumps(issuer.jwks()))
    fresh = issuer.token("b")
    with pytest.raises(Unauthenticated, match="unknown key"):
        await verifier.authenticate(fresh)  # within the refresh gap: not fetched again
    now[0] += REFRESH_GAP
    assert (await verifier.authenticate(fresh)).name == "b"
    # The key set disappears: known keys still verify, unknown ones are UNAVAILABLE.
    jwks.unlink()
    now[0] += REFRESH_GAP
    assert (await verifier.authenticate(issuer.token("c"))).name == "c"
    issuer.rotate()
    with pytest.raises(AuthUnavailable):
        await verifier.authenticate(issuer.token("d"))
    with pytest.raises(Unauthenticated, match="algorithm"):
        await verifier.authenticate(jwt.encode({"sub": "x"}, "s" * 32, algorithm="HS256"))


def test_startup_warnings_name_the_risk() -> None:
    from vmpool.auth.setup import startup_warnings

    demo = parse_config({"listen": "127.0.0.1:50051"})
    assert startup_warnings(demo, ["127.0.0.1:50051", ""]) == []
    open_none = startup_warnings(demo, ["0.0.0.0:50051"])
    assert len(open_none) == 1 and "anyone who can reach it" in open_none[0]
    jwt_plain = parse_config(
        {"auth": {"mode": "jwt", "jwt": {"issuer": "i", "jwks_file": "k.json"}}}
    )
    [warning] = startup_warnings(jwt_plain, ["0.0.0.0:50051"])
    assert "without TLS" in warning


def test_tls_context_reloads_changed_files_and_keeps_the_old_on_failure(tmp_path: Path) -> None:
    from tests.e2e.identity_kit import Pki
    from vmpool.config.schema import TlsConfig
    from vmpool.wire.tls import ReloadingContext, TlsError, build_context

    pki = Pki(tmp_path)
    served = pki.server("s")
    cfg = TlsConfig(cert_file=str(served.cert), key_file=str(served.key))
    ctx = ReloadingContext(cfg)
    assert ctx.current() is ctx.context and ctx.reloads == 0
    fresh = pki.server("t")
    served.cert.write_bytes(fresh.cert.read_bytes())
    served.key.write_bytes(fresh.key.read_bytes())
    first = ctx.current()
    assert first is not ctx.context and ctx.reloads == 1
    assert ctx.current() is first  # unchanged files: no reload
    served.key.write_text("half-written")  # mid-rotation
    assert ctx.current() is first and ctx.reloads == 1
    with pytest.raises(TlsError, match=r"tls\.cert_file"):
        build_context(cfg)


async def test_token_reviews_are_shared_cached_and_refusals_remembered() -> None:
    import asyncio

    from vmpool.auth.kubernetes import REJECTED_TTL, TokenReviewer

    now = [100.0]
    gate = asyncio.Event()

    async def review(body: Any) -> Any:
        await gate.wait()
        if body.spec.token == "good":
            user = SimpleNamespace(username="system:serviceaccount:a:ci", groups=[])
            return SimpleNamespace(
                status=SimpleNamespace(authenticated=True, user=user, audiences=["vmpool"])
            )
        return SimpleNamespace(
            status=SimpleNamespace(authenticated=False, user=None, audiences=None, error="bad")
        )

    reviewer = TokenReviewer(None, ["vmpool"], 60.0, review=review, mono=lambda: now[0])
    calls = [asyncio.ensure_future(reviewer.authenticate("good")) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    assert {p.name for p in await asyncio.gather(*calls)} == {"system:serviceaccount:a:ci"}
    assert reviewer.reviews == 1  # ten concurrent calls, one TokenReview
    await reviewer.authenticate("good")
    assert reviewer.reviews == 1  # cached
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="bad"):
            await reviewer.authenticate("forged")
    assert reviewer.reviews == 2  # a refusal is remembered
    now[0] += REJECTED_TTL
    with pytest.raises(Unauthenticated):
        await reviewer.authenticate("forged")
    assert reviewer.reviews == 3
    now[0] += 61
    await reviewer.authenticate("good")
    assert reviewer.reviews == 4  # the cache entry expired
