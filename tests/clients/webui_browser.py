"""The chat page at `/` in a real headless browser (Debian's chromium and chromium-driver, driven
by selenium): the page loads under its Content-Security-Policy without errors, lists the model,
streams a reply with its speed and cache figures, shows a tool call as a call, offers the models
to pick from, and its Stop button aborts the request, which
the server sees (its generation is cancelled: /metrics counts it).

Usage: python3 webui_browser.py BASE_URL   (prints "ok", or "skip: ..." without chromium, its
driver or selenium)
"""

import json
import re
import shutil
import sys
import time
import urllib.request

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:
    print(f"skip: selenium cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

browser = shutil.which("chromium") or shutil.which("chromium-browser")
driver_path = shutil.which("chromedriver")
if not browser or not driver_path:
    print("skip: chromium or chromedriver is not installed (apt-get install -y chromium chromium-driver)")
    sys.exit(0)

base = sys.argv[1]


def metric(name):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


options = webdriver.ChromeOptions()
options.binary_location = browser
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]:
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
# The given driver: selenium must not look for (or download) one itself.
driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
try:
    wait = WebDriverWait(driver, 240)
    driver.get(base + "/")
    assert driver.title == "qwen-run", driver.title
    # Several models served: the picker lists them, the first (the default) chosen. (One model:
    # its name is shown instead.)
    models = [m["id"] for m in json.load(urllib.request.urlopen(base + "/v1/models", timeout=30))["data"]]
    if len(models) > 1:
        wait.until(lambda d: d.find_element(By.ID, "model-picker").is_displayed())
        options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]
        assert options == models, (options, models)
        assert driver.find_element(By.ID, "model").get_attribute("value") == models[0]
    else:
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == models[0])
        assert not driver.find_element(By.ID, "model-picker").is_displayed()

    def setting(id, value):
        e = driver.find_element(By.ID, id)
        e.clear()
        e.send_keys(value)

    driver.find_element(By.ID, "settings-toggle").click()
    setting("system", "You are brief.")
    setting("temperature", "0")
    setting("seed", "7")
    setting("max_tokens", "24")

    def ask(text):
        box = driver.find_element(By.ID, "input")
        box.send_keys(text)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "streaming")

    def last_answer():
        return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]

    # A reply streams, and ends with its figures.
    ask("Say hello.")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    answer = last_answer()
    reply = answer.find_element(By.CLASS_NAME, "content").text
    stats = answer.find_element(By.CLASS_NAME, "stats").text
    assert reply.strip(), "empty reply"
    assert "tok/s" in stats and "cached" in stats, stats
    assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None, driver.find_element(By.ID, "error").text

    # A second turn reuses the first's prompt as its cached prefix.
    ask("Thanks.")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    stats = last_answer().find_element(By.CLASS_NAME, "stats").text
    cached = int(re.search(r"\((\d+) cached\)", stats).group(1))
    assert cached > 0, stats

    # With tools given, the model's call is shown as a call.
    driver.find_element(By.ID, "new-chat").click()
    setting("system", " ")
    setting("tools", json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]))
    setting("max_tokens", "60")
    ask("What is the weather in Paris? Use the tool.")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    call = last_answer().find_element(By.CLASS_NAME, "tool-call")
    assert call.find_element(By.CLASS_NAME, "tool-name").text == "tool call: get_weather", call.text
    assert json.loads(call.find_element(By.CLASS_NAME, "tool-arguments").text)["city"] == "Paris", call.text
    assert last_answer().find_element(By.CLASS_NAME, "stats").text.endswith("tool_calls")
    driver.find_element(By.ID, "tools").clear()

    # A long answer, stopped while it streams: the server cancels its generation.
    cancelled = metric("qwen_run_generations_cancelled_total")
    setting("max_tokens", "3000")
    driver.find_element(By.ID, "new-chat").click()
    ask("Count from 1 to 1000, one number per line.")
    wait.until(lambda d: len(last_answer().find_element(By.CLASS_NAME, "content").text) > 20)
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    stats = last_answer().find_element(By.CLASS_NAME, "stats").text
    assert stats == "stopped", (stats, driver.find_element(By.ID, "error").text, last_answer().text)
    deadline = time.time() + 30
    while metric("qwen_run_generations_cancelled_total") == cancelled:
        assert time.time() < deadline, "the server did not cancel the stopped generation"
        time.sleep(0.2)
    assert metric("qwen_run_requests_processing") == 0

    # Nothing the page did broke its Content-Security-Policy or threw.
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
finally:
    driver.quit()
print("ok")
