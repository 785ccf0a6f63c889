"""The Redis passwords come separately from the URLs and are put into them quoted (issue 18, 3).

A deployment passes secrets as variables of their own (Compose cannot URL-quote one into a URL): whatever
characters the password has, redis-py and Celery's kombu must read back exactly it, and a refusal must say
which variable is wrong without showing the password.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.utils.url import url_to_parts
from redis.connection import parse_url

from autoscaler.settings import SettingsError, load_settings

PASSWORDS = st.text(min_size=1, max_size=40).filter(str.strip)  # a blank one means "unset", as elsewhere
URLS = st.sampled_from(["redis://redis:6379/0", "rediss://broker.example:6380/2", "redis://user@redis:6379/0",
                        "redis://[::1]:6379/0", "redis://redis", "unix:///run/redis.sock?db=1"])


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTOSCALER_REDIS_URL", "AUTOSCALER_STATE_REDIS_URL", "AUTOSCALER_REDIS_PASSWORD",
                 "AUTOSCALER_STATE_REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@settings(max_examples=200, deadline=None)
@given(url=URLS, password=PASSWORDS, state_password=PASSWORDS)
def test_any_password_reaches_the_clients_unchanged(url: str, password: str, state_password: str) -> None:
    loaded = load_settings(redis_url=url, redis_password=password, state_redis_url="redis://autoscaler-state:6379/0",
                           state_redis_password=state_password)
    assert parse_url(loaded.redis_url)["password"] == password
    if not url.startswith("unix://"):
        assert url_to_parts(loaded.redis_url).password == password  # Celery's busy probe reads it with kombu
        assert parse_url(loaded.redis_url)["host"] == parse_url(url)["host"]
    assert parse_url(loaded.redis_url).get("db") == parse_url(url).get("db")
    assert parse_url(loaded.redis_url).get("username") == parse_url(url).get("username")
    assert parse_url(loaded.state_redis_url or "")["password"] == state_password


@settings(max_examples=100, deadline=None)
@given(PASSWORDS)
def test_a_refusal_is_located_and_never_shows_the_password(text: str) -> None:
    password = f"<secret {text}>"
    cases = [
        ({"redis_url": "redis://:inurl@redis:6379/0", "redis_password": password},
         "AUTOSCALER_REDIS_URL has a password and AUTOSCALER_REDIS_PASSWORD is set too"),
        ({"state_redis_password": password},
         "AUTOSCALER_STATE_REDIS_PASSWORD is set but AUTOSCALER_STATE_REDIS_URL is not"),
        ({"redis_password": password, "redis_url": "http://redis"}, "AUTOSCALER_REDIS_URL='http://redis': must"),
    ]
    for overrides, located in cases:
        with pytest.raises(SettingsError) as refused:
            load_settings(**overrides)
        assert located in str(refused.value)
        assert password not in str(refused.value) and repr(password) not in str(refused.value)


def test_from_the_environment_and_an_empty_one_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOSCALER_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("AUTOSCALER_REDIS_PASSWORD", "a/b@c%41:d")
    monkeypatch.setenv("AUTOSCALER_STATE_REDIS_PASSWORD", "")
    loaded = load_settings()
    assert loaded.redis_url == "redis://:a%2Fb%40c%2541%3Ad@redis:6379/0" and loaded.state_redis_url is None
    assert "a/b@c" not in repr(loaded.redis_password)
