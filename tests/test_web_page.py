"""The web chat page (ossgpt/serve/static/index.html) in a real headless browser against a live server.

Debian's chromium and chromedriver drive the page (`.ci/run` installs them); the server is `ossgpt serve`'s app on
uvicorn with the tiny scripted model of tests/serve_helpers.py, so each reply is known: an analysis message (the
reasoning, shown collapsed) then a final one (the answer). What the page sends is read where the server takes it.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'ossgpt[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'ossgpt[serve]')")
pytest.importorskip("selenium", reason="selenium is not installed (pip install 'ossgpt[dev]')")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)  # fmt: skip

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from ossgpt.serve.app import create_app  # noqa: E402
from ossgpt.tokenizer import HarmonyTokenizer  # noqa: E402
from serve_helpers import Scripted, _ends, serving, tiny_config  # noqa: E402

NAME = "tiny-oss"
REASONING, ANSWER = "The user says hello; greet them back.", "Hello! How can I help?"
STEP_S = 0.005  # a pause per engine step while a long reply streams, so that Stop lands in the middle of it


@pytest.fixture(scope="module")
def model():
    try:
        tokenizer = HarmonyTokenizer("o200k_harmony")
    except Exception as err:  # no ranks file in tiktoken's cache and no network
        pytest.skip(f"o200k_harmony is not available here ({err}); set TIKTOKEN_CACHE_DIR to a cache holding it")
    torch.manual_seed(0)
    return Scripted(tiny_config(), tokenizer).eval()


@pytest.fixture(scope="module")
def app(model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine a second OpenMP thread makes these tiny ops slower
    yield create_app(model, model.tokenizer, NAME, max_batch=4, max_queue=4, sampling={"temperature": 0})
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def requests(app):
    """The conversations the page sends, as the server receives them."""
    served = app.state.served
    received, chat_prompt = [], served.chat_prompt

    def recorded(messages, *args, **kwargs):
        received.append(messages)
        return chat_prompt(messages, *args, **kwargs)

    served.chat_prompt = recorded
    yield received
    del served.chat_prompt


@pytest.fixture(scope="module")
def url(app, requests):
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, url):
    """The page, freshly loaded, once it shows the served model's name."""
    browser.get(url)
    wait(browser, lambda b: b.find_element(By.ID, "model").text == NAME)
    return browser


def wait(browser, condition, timeout: float = 10):
    return WebDriverWait(browser, timeout, poll_frequency=0.02).until(condition)


def send(page, text: str, enter: bool = True) -> None:
    page.find_element(By.ID, "input").send_keys(text)
    if enter:
        page.find_element(By.ID, "input").send_keys(Keys.ENTER)
    else:
        page.find_element(By.ID, "send").click()


def last_reply(page):
    return page.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def reply_in(page, state: str):
    """The last reply once its state (streaming, done, stopped) is `state`."""
    return wait(page, lambda p: (r := last_reply(p)).get_attribute("data-state") == state and r)


def greeting(model, marker: str) -> str:
    return model.script(marker, f"<|channel|>analysis<|message|>{REASONING}<|end|>"
                                f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>")  # fmt: skip


def test_a_reply_streams_in_with_its_reasoning_collapsed_and_the_next_turn_sends_the_history(page, model, requests):
    first = greeting(model, "script: hi page")
    send(page, first)
    reply = reply_in(page, "done")
    assert reply.find_element(By.CSS_SELECTOR, ".content").text == ANSWER
    details = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert details.is_displayed() and details.get_attribute("open") is None  # collapsed
    assert not reply.find_element(By.CSS_SELECTOR, ".reasoning-text").is_displayed()
    details.find_element(By.TAG_NAME, "summary").click()
    assert details.get_attribute("open") is not None
    assert reply.find_element(By.CSS_SELECTOR, ".reasoning-text").text == REASONING
    assert [m.text for m in page.find_elements(By.CSS_SELECTOR, ".message.user")] == [first]

    page.find_element(By.CSS_SELECTOR, "#effort option[value='high']").click()
    second = greeting(model, "script: and again")
    send(page, second, enter=False)
    assert reply_in(page, "done").find_element(By.CSS_SELECTOR, ".content").text == ANSWER
    assert requests[-1] == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": ANSWER, "reasoning": REASONING},
        {"role": "user", "content": second},
    ]
    # The server rendered that history, the earlier answer included, with the effort chosen.
    prompt = model.prompts[-1]
    assert _ends(prompt, tuple(model.tokenizer.encode_ordinary(ANSWER)))
    assert _ends(prompt, tuple(model.tokenizer.encode_ordinary("Reasoning: high")))


def test_stop_ends_a_long_reply_and_frees_its_row(page, model, app):
    model.script("script: talk", "<|channel|>final<|message|>" + "word " * 1000 + "<|return|>")
    engine = app.state.served.worker.engine
    events, step = [], engine.step
    engine.step = lambda: (time.sleep(STEP_S), result := step(), events.extend(result))[1]
    try:
        send(page, "script: talk")
        streaming = reply_in(page, "streaming")
        wait(page, lambda p: streaming.find_element(By.CSS_SELECTOR, ".content").text.count("word") >= 5)
        assert page.find_element(By.ID, "send").get_attribute("disabled") is not None
        page.find_element(By.ID, "stop").click()
        reply = reply_in(page, "stopped")
        shown = reply.find_element(By.CSS_SELECTOR, ".content").text
        assert shown.startswith("word word") and shown.count("word") < 1000
        assert "(stopped)" in reply.text
        wait(page, lambda p: any(event.finish_reason for event in events))
    finally:
        del engine.step
    assert events[-1].finish_reason == "cancelled" and len(events) < 1000
    assert reply.find_element(By.CSS_SELECTOR, ".content").text == shown  # nothing arrives after Stop
    assert page.find_element(By.ID, "send").get_attribute("disabled") is None
    assert page.find_element(By.ID, "stop").get_attribute("disabled") is not None


def test_a_server_error_is_shown_and_the_message_kept_for_a_retry(page, requests):
    count = len(requests)
    # An effort the server refuses (its 400 names reasoning_effort); the page's own choices are all valid.
    page.execute_script("document.querySelector('#effort').add(new Option('extreme', 'extreme', true, true))")
    send(page, "Hello?")
    error = wait(page, lambda p: p.find_element(By.CSS_SELECTOR, ".message.error"))
    assert error.text.startswith("Error: reasoning_effort") and error.get_attribute("role") == "alert"
    assert page.find_element(By.ID, "input").get_attribute("value") == "Hello?"
    assert not page.find_elements(By.CSS_SELECTOR, ".message.user, .message.assistant")
    assert len(requests) == count  # refused before a prompt was built
