// Chat page: POST /chat, read the SSE body as it arrives, show tokens with a cursor.
(function () {
  "use strict";
  const form = document.getElementById("form");
  const promptBox = document.getElementById("prompt");
  const thinkingBox = document.getElementById("thinking");
  const sendBtn = document.getElementById("send");
  const stopBtn = document.getElementById("stop");
  const log = document.getElementById("log");
  const FENCE = "```";
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

  // The form is sticky at the bottom of the page, so an element scrolled to the
  // viewport's bottom (scrollIntoView) sits under it. At the very end of the page
  // the form is in its own place below the log, and nothing is covered.
  function nearBottom() {
    const root = document.scrollingElement;
    return root.scrollHeight - root.scrollTop - root.clientHeight < 80;
  }

  function toBottom() {
    const root = document.scrollingElement;
    root.scrollTop = root.scrollHeight;
  }

  // Run a DOM change; keep following the conversation if the reader was at its end
  // (someone who scrolled up to reread is left where they are).
  function update(change) {
    const follow = nearBottom();
    change();
    if (follow) toBottom();
  }

  // Text between ``` fences becomes a code block; a fence still open while
  // tokens arrive shows as a block that is growing.
  function render(target, text) {
    const parts = text.split(FENCE);
    const nodes = [];
    parts.forEach(function (part, i) {
      if (i % 2 === 0) {
        if (i > 0) part = part.replace(/^\n+/, "");  // the block already breaks the line
        if (i < parts.length - 1) part = part.replace(/\n+$/, "");
        if (part) nodes.push(document.createTextNode(part));
        return;
      }
      const newline = part.indexOf("\n");
      const lang = (newline < 0 ? part : part.slice(0, newline)).trim();
      const pre = el("pre");
      const code = el("code", lang ? "language-" + lang : "", newline < 0 ? "" : part.slice(newline + 1).replace(/\n$/, ""));
      pre.appendChild(code);
      nodes.push(pre);
    });
    target.replaceChildren.apply(target, nodes);
  }

  async function send(prompt, thinking) {
    const bot = el("div", "msg bot");
    const thought = el("div", "thinking");
    const answer = el("div", "answer");
    const cursor = el("span", "cursor");
    let text = "";
    bot.append(thought, answer, cursor);
    update(function () { log.append(el("div", "msg user", prompt), bot); });
    toBottom();  // a new question always brings the reader to the end
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
        let thinkingText = "";
        let grew = false;
        while ((sep = buffer.indexOf("\n\n")) >= 0) {
          const item = parseEvent(buffer.slice(0, sep));
          buffer = buffer.slice(sep + 2);
          if (item === DONE) { done = true; continue; }
          if (!item) continue;
          if (item.phase === "thinking") thinkingText += item.token;
          else { text += item.token; grew = true; }
        }
        update(function () {
          if (thinkingText) thought.textContent += thinkingText;
          if (grew) render(answer, text);
        });
      }
      if (!done) throw new Error("the stream ended early; please try again");
      bot.dataset.done = "true";
    } catch (err) {
      update(function () {
        if (err.name === "AbortError") {
          bot.appendChild(el("div", "stopped", "Stopped. The answer above is as far as it got."));
          bot.dataset.stopped = "true";
        } else {
          bot.appendChild(el("div", "error", "Error: " + err.message));
          bot.dataset.error = "true";
        }
      });
    } finally {
      update(function () { cursor.remove(); });
      controller = null;
      setBusy(false);
    }
  }

  const DONE = {};

  // One SSE block: DONE for the final [DONE], null for nothing, else the token object.
  function parseEvent(block) {
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) type = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    const payload = data.join("\n");
    if (payload === "[DONE]") return DONE;
    if (!payload) return null;
    const item = JSON.parse(payload);
    if (type === "error") throw new Error(item.error || item.message || "the model failed");
    return item;
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
