// Chat page: POST /chat, read the SSE body as it arrives, show tokens with a cursor.
(function () {
  "use strict";
  const form = document.getElementById("form");
  const promptBox = document.getElementById("prompt");
  const thinkingBox = document.getElementById("thinking");
  const sendBtn = document.getElementById("send");
  const stopBtn = document.getElementById("stop");
  const log = document.getElementById("log");
  let controller = null;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text) node.textContent = text;
    return node;
  }

  function setBusy(busy) {
    sendBtn.disabled = busy;
    stopBtn.disabled = !busy;
    document.body.dataset.state = busy ? "streaming" : "idle";
  }

  async function send(prompt, thinking) {
    log.appendChild(el("div", "msg user", prompt));
    const bot = el("div", "msg bot");
    const thought = el("div", "thinking");
    const answer = el("span", "answer");
    const cursor = el("span", "cursor");
    bot.append(thought, answer, cursor);
    log.appendChild(bot);
    bot.scrollIntoView({ block: "end" });
    controller = new AbortController();
    setBusy(true);
    try {
      const resp = await fetch("/chat", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
        body: JSON.stringify({ prompt: prompt, thinking: thinking }),
        signal: controller.signal,
      });
      if (!resp.ok) {
        let message = resp.status + " " + resp.statusText;
        try { message = (await resp.json()).error || message; } catch (e) { /* not JSON */ }
        throw new Error(message);
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const part = await reader.read();
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        let sep;
        while ((sep = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, sep);
          buffer = buffer.slice(sep + 2);
          done = handleEvent(block, thought, answer) || done;
        }
        bot.scrollIntoView({ block: "end" });
      }
      if (!done) throw new Error("the stream ended early; please try again");
      bot.dataset.done = "true";
    } catch (err) {
      if (err.name === "AbortError") {
        bot.appendChild(el("div", "stopped", "stopped"));
        bot.dataset.stopped = "true";
      } else {
        bot.appendChild(el("div", "error", "Error: " + err.message));
        bot.dataset.error = "true";
      }
    } finally {
      cursor.remove();
      controller = null;
      setBusy(false);
    }
  }

  // Returns true on the final [DONE] event.
  function handleEvent(block, thought, answer) {
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) type = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    const payload = data.join("\n");
    if (payload === "[DONE]") return true;
    if (!payload) return false;
    const item = JSON.parse(payload);
    if (type === "error") throw new Error(item.error || item.message || "the model failed");
    if (item.phase === "thinking") thought.textContent += item.token;
    else answer.textContent += item.token;
    return false;
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const prompt = promptBox.value.trim();
    if (!prompt || controller) return;
    promptBox.value = "";
    send(prompt, thinkingBox.checked);
  });
  promptBox.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
  });
  stopBtn.addEventListener("click", function () { if (controller) controller.abort(); });
  setBusy(false);
})();
