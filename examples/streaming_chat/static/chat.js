// Chat page: POST /chat and read the SSE body as it arrives, or send prompts over one
// WebSocket to /chat/ws (?transport=ws); either way tokens show as they come, with a cursor.
(function () {
  "use strict";
  const form = document.getElementById("form");
  const promptBox = document.getElementById("prompt");
  const thinkingBox = document.getElementById("thinking");
  const transportBox = document.getElementById("transport");
  const sendBtn = document.getElementById("send");
  const stopBtn = document.getElementById("stop");
  const log = document.getElementById("log");
  const FENCE = "```";
  let stop = null;  // stops the answer being streamed; null when idle

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text) node.textContent = text;
    return node;
  }

  function setBusy(busy) {
    sendBtn.disabled = busy;
    stopBtn.disabled = !busy;
    transportBox.disabled = busy;
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

  // One question and its answer on the page; both transports feed it the same way.
  function exchange(prompt) {
    const bot = el("div", "msg bot");
    const thought = el("div", "thinking");
    const answer = el("div", "answer");
    const cursor = el("span", "cursor");
    let text = "";
    bot.append(thought, answer, cursor);
    update(function () { log.append(el("div", "msg user", prompt), bot); });
    toBottom();  // a new question always brings the reader to the end
    setBusy(true);
    return {
      // Tokens that arrived together ({token, phase}) are shown in one DOM change.
      add: function (items) {
        let thinkingText = "";
        let grew = false;
        items.forEach(function (item) {
          if (item.phase === "thinking") thinkingText += item.token;
          else { text += item.token; grew = true; }
        });
        update(function () {
          if (thinkingText) thought.textContent += thinkingText;
          if (grew) render(answer, text);
        });
      },
      done: function () { bot.dataset.done = "true"; },
      stopped: function () {
        update(function () {
          bot.appendChild(el("div", "stopped", "Stopped. The answer above is as far as it got."));
          bot.dataset.stopped = "true";
        });
      },
      failed: function (message) {
        update(function () {
          bot.appendChild(el("div", "error", "Error: " + message));
          bot.dataset.error = "true";
        });
      },
      end: function () {
        update(function () { cursor.remove(); });
        stop = null;
        setBusy(false);
      },
    };
  }

  async function sendSSE(prompt, thinking) {
    const ex = exchange(prompt);
    const controller = new AbortController();
    stop = function () { controller.abort(); };
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
        const items = [];
        while ((sep = buffer.indexOf("\n\n")) >= 0) {
          const item = parseEvent(buffer.slice(0, sep));
          buffer = buffer.slice(sep + 2);
          if (item === DONE) { done = true; continue; }
          if (item) items.push(item);
        }
        ex.add(items);
      }
      if (!done) throw new Error("the stream ended early; please try again");
      ex.done();
    } catch (err) {
      if (err.name === "AbortError") ex.stopped();
      else ex.failed(err.message);
    } finally {
      ex.end();
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

  // WebSocket mode: one socket, opened on the first prompt and kept for the next ones.
  // The server answers one prompt at a time, so its messages belong to `current`.
  let socket = null;
  let socketReady = null;
  let current = null;

  function connect() {
    if (socket) return socketReady;
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/chat/ws");
    let opened = false;
    socket = ws;
    socketReady = new Promise(function (resolve) {
      ws.addEventListener("open", function () { opened = true; resolve(ws); });
    });
    ws.addEventListener("message", function (ev) {
      const msg = JSON.parse(ev.data);
      if (!current) return;
      if (msg.type === "token") current.add([{ token: msg.text, phase: msg.phase }]);
      else if (msg.type === "done") finish(function (ex) { ex.done(); });
      else if (msg.type === "stopped") finish(function (ex) { ex.stopped(); });
      else if (msg.type === "error") finish(function (ex) { ex.failed(msg.message); });
    });
    ws.addEventListener("close", function () {
      if (socket === ws) socket = null;  // the next prompt opens a new one
      const message = opened ? "the connection closed; please try again" : "could not open a WebSocket to the chat";
      finish(function (ex) { ex.failed(message); });
    });
    return socketReady;
  }

  function finish(how) {
    const ex = current;
    if (!ex) return;
    current = null;
    how(ex);
    ex.end();
  }

  function sendWS(prompt, thinking) {
    const ex = exchange(prompt);
    current = ex;
    stop = function () {
      // The server answers a stop with "stopped"; before the socket is open nothing was asked yet.
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "stop" }));
      else finish(function (ex) { ex.stopped(); });
    };
    connect().then(function (ws) {
      if (current === ex) ws.send(JSON.stringify({ prompt: prompt, thinking: thinking }));
    });
  }

  // ?transport=ws picks the WebSocket; changing the select keeps the URL in step, for reloads and links.
  const params = new URLSearchParams(location.search);
  transportBox.value = params.get("transport") === "ws" ? "ws" : "sse";
  transportBox.addEventListener("change", function () {
    if (transportBox.value === "ws") params.set("transport", "ws");
    else params.delete("transport");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
    if (transportBox.value !== "ws" && socket) socket.close();
  });

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const prompt = promptBox.value.trim();
    if (!prompt || stop) return;
    promptBox.value = "";
    if (transportBox.value === "ws") sendWS(prompt, thinkingBox.checked);
    else sendSSE(prompt, thinkingBox.checked);
  });
  promptBox.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
  });
  stopBtn.addEventListener("click", function () { if (stop) stop(); });
  setBusy(false);
})();
