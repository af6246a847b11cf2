// The R²ec page: build a history, ask for recommendations, watch the reasoning arrive.
// No build step and no dependencies: the service serves this file as it is.
//
// Streaming: POST /recommend/stream (Server-Sent Events) sends `reasoning` events (the text as
// it is written: {"text": piece}), one `items` event ({"items": [...], "model_version", ...}),
// a `done` event ({"reasoning_tokens", "cache", "timings"}), or an `error` event (the API's
// error body, {"error": {"status", "message", ...}}); refusals come before it as plain JSON
// errors. The parser also takes {"delta": ...} or plain-text pieces, a bare item list and
// {"message": ...} errors.
// A server without that route answers 404 or 405: the page then asks POST /recommend and shows
// the reasoning when the whole answer arrives.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);

const state = {
  history: [], // {item_id, title, year, genres, rating: number|null, timestamp?: number|null}
  matches: [], // last search results
  userId: null, // set by "Load history"
  stream: "unknown", // "unknown" | "yes" | "no": does POST /recommend/stream exist?
  running: null, // AbortController of the current run
  items: new Map(), // item_id -> GET /items/{id} reply (or a promise of it)
  // The last answer's read window: {unread: Set of history entries its prompt left out, n: how
  // many it read}; null when all were read or the history changed since.
  readWindow: null,
};

// ------------------------------------------------------------------ HTTP
// What the page says when the service cannot be reached: a fetch that fails, or a stream that
// breaks off (the browser's own words, "Failed to fetch" or "network error", explain nothing).
const NO_ANSWER = "The service did not answer: is it still running?";
const BROKE_OFF = "The service stopped answering before the answer was complete: is it still running?";

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The API's words for a failed response: `message`, else `detail` (a string or field errors).
async function apiMessage(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON */
  }
  const fromBody = (b) => {
    if (!b || typeof b !== "object") return null;
    if (typeof b.message === "string" && b.message) return b.message;
    if (b.error && typeof b.error === "object") return fromBody(b.error);
    if (typeof b.error === "string") return b.error;
    if (typeof b.detail === "string") return b.detail;
    if (Array.isArray(b.detail)) {
      return b.detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
    }
    return null;
  };
  return fromBody(body) || `${response.status} ${response.statusText || "error"}`;
}

// A server with R2EC_CLIENT_KEY set answers its routes of users' data (/recommend, /users/...)
// 401 without the key: the page then shows its "API key" field, keeps what is typed there in
// this tab only (sessionStorage) and sends it as X-API-Key from then on.
const KEY_STORE = "r2ec-api-key";
const KEY_MISSING = "This server asks for an API key for users’ data: enter it under “API key” and try again.";
const KEY_WRONG = "The server did not accept that API key: check it under “API key”.";

// After a refusal for the key, the field that answers it: marked invalid until typed in, and
// focused (it may have only just appeared, in another section than the button pressed) with what
// it holds selected, so typing replaces a wrong key; the error itself is announced (role=alert).
// Focused only while the focus is still `from` where the person asked (or lost): one who has
// moved on meanwhile keeps their place.
function focusKey(err, ...from) {
  if (!(err instanceof ApiError) || !err.forKey) return;
  const key = $("#api-key");
  key.setAttribute("aria-invalid", "true");
  const at = document.activeElement;
  if (at && at !== document.body && !from.some((el) => el.contains(at))) return;
  key.focus();
  key.select();
}

function keyHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "x-api-key": key } : {};
}

// A refusal for the key: show the field and say what to do; else the API's own words.
async function refusal(response) {
  if (response.status === 401 || response.status === 403) {
    $("#key-row").hidden = false;
    const err = new ApiError(response.status, response.status === 401 ? KEY_MISSING : KEY_WRONG);
    err.forKey = true;
    return err;
  }
  return new ApiError(response.status, failedWords(response.status, await apiMessage(response)));
}

// A 500 says only "internal error (request <id>)": the server's log has the rest under that id,
// so say what to do with it. Any other message is the API's own words, shown as they are.
function failedWords(status, message) {
  if (status !== 500 || !/^internal error \(request [^)]+\)$/.test(message)) return message;
  return `The service failed to answer: ${message}. Try again; if it keeps failing, give whoever runs it that request id.`;
}

async function api(path, options = {}) {
  const init = {
    ...options,
    headers: { accept: "application/json", ...keyHeaders(), ...(options.headers || {}) },
  };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(options.json);
    init.headers["content-type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, NO_ANSWER);
  }
  if (!response.ok) throw await refusal(response);
  return response.json();
}

function showError(box, err) {
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = err instanceof ApiError ? err.message : `Something went wrong: ${err.message || err}`;
  box.hidden = false;
}

// GET /items/{id}, once per id: year and genres for history rows and results.
function itemDetails(itemId) {
  if (!state.items.has(itemId)) {
    state.items.set(
      itemId,
      api(`/items/${encodeURIComponent(itemId)}`).catch(() => null),
    );
  }
  return state.items.get(itemId);
}

function subtitle(item) {
  const year = String(item.year || "").replace(/\.0$/, "");
  return [year, item.genres].filter(Boolean).join(" · ");
}

// Right-to-left text (Hebrew, Arabic titles; user ids) inside a line of other text: each title
// is isolated, so the bidi algorithm orders it on its own. Unisolated, "Added ואלס עם באשיר. 2 in
// your history." displayed as "Added 2 .ואלס עם באשיר in your history.", and two RTL titles in a
// list swapped places.
function bdi(text) {
  const node = document.createElement("bdi");
  node.textContent = text;
  return node;
}

// An element's text from strings and nodes (a `bdi` around each title or id).
function say(el, ...parts) {
  el.replaceChildren(...parts.map((p) => (typeof p === "string" ? document.createTextNode(p) : p)));
}

// The title line and the grey line under it, as every list on the page shows an item; the
// title takes its direction from its own first strong character (dir="auto", which isolates it).
// Append them with `SPACE` between: the layout ignores it (a flex or grid container drops a
// white-space-only text node), but the text read out and matched against a control's name is then
// "Toy Story 1995", not "Toy Story1995".
const SPACE = " ";
function titleSpans(titleText, subText = "") {
  const title = document.createElement("span");
  title.className = "title";
  title.dir = "auto";
  title.textContent = titleText;
  const sub = document.createElement("span");
  sub.className = "sub";
  sub.textContent = subText;
  return [title, sub];
}

// ------------------------------------------------------------------ the server line
async function showServer() {
  const line = $("#server");
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    line.textContent =
      body.status === "ready"
        ? `Model ${body.model_version} · ${body.items} items in the catalog`
        : `Not ready yet: ${(body.reasons || []).join("; ") || body.message || r.status}`;
  } catch {
    line.textContent = "The service did not answer.";
  }
}

// ------------------------------------------------------------------ search
let searchTimer = null;
let searchSeq = 0;
let searched = ""; // the query state.matches answer

async function search(q) {
  clearTimeout(searchTimer);
  const seq = ++searchSeq;
  searched = q;
  const status = $("#q-status");
  if (!q.trim()) {
    state.matches = [];
    renderMatches();
    status.textContent = "";
    return;
  }
  try {
    const body = await api(`/items?q=${encodeURIComponent(q)}&limit=8`);
    if (seq !== searchSeq) return; // a later keystroke won
    state.matches = body.items;
    renderMatches();
    if (body.items.length) status.textContent = `${body.items.length} match${body.items.length === 1 ? "" : "es"}`;
    else say(status, "No film matches “", bdi(q), "”.");
  } catch (err) {
    if (seq !== searchSeq) return;
    state.matches = [];
    renderMatches();
    status.textContent = err.message;
  }
}

function renderMatches() {
  const list = $("#matches");
  list.replaceChildren();
  const inHistory = new Set(state.history.map((h) => h.item_id));
  for (const item of state.matches) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "match";
    button.dataset.itemId = item.item_id;
    const [title, sub] = titleSpans(item.title, subtitle(item));
    // The button's name is its text, the action first ("add Toy Story 1995 · Animation"): it
    // contains every word on the button, as WCAG 2.5.3 asks (an aria-label that left out
    // "+ add" did not). The grid (app.css) still shows the action on the right.
    const action = document.createElement("span");
    action.className = "action";
    const added = inHistory.has(item.item_id);
    if (!added) {
      const plus = document.createElement("span");
      plus.setAttribute("aria-hidden", "true"); // not read out as "plus"
      plus.textContent = "+ ";
      action.append(plus);
    }
    action.append(added ? "added" : "add");
    button.disabled = added;
    button.append(action, SPACE, title, SPACE, sub);
    button.addEventListener("click", () => addToHistory(item, 5, { focusSearch: true }));
    li.append(button);
    list.append(li);
  }
}

async function onSearchKey(event) {
  if (event.key === "Enter") {
    event.preventDefault();
    const q = event.target.value;
    if (q !== searched) await search(q); // typed faster than the search ran
    const first = state.matches.find((m) => !state.history.some((h) => h.item_id === m.item_id));
    if (first) addToHistory(first, 5, { focusSearch: true });
  } else if (event.key === "ArrowDown") {
    const first = $("#matches button:not(:disabled)");
    if (first) {
      event.preventDefault();
      first.focus();
    }
  } else if (event.key === "Escape") {
    $("#q").value = "";
    search("");
  }
}

function onMatchesKey(event) {
  const buttons = [...document.querySelectorAll("#matches button:not(:disabled)")];
  const at = buttons.indexOf(document.activeElement);
  if (at < 0) return;
  if (event.key === "ArrowDown" && at + 1 < buttons.length) {
    event.preventDefault();
    buttons[at + 1].focus();
  } else if (event.key === "ArrowUp") {
    event.preventDefault();
    (at === 0 ? $("#q") : buttons[at - 1]).focus();
  } else if (event.key === "Escape") {
    $("#q").focus();
  }
}

// ------------------------------------------------------------------ history
function addToHistory(item, rating, { focusSearch = false } = {}) {
  if (state.history.some((h) => h.item_id === item.item_id)) return;
  state.readWindow = null; // the marks were for the history the last answer read
  state.history.push({
    item_id: item.item_id,
    title: item.title,
    year: item.year || "",
    genres: item.genres || "",
    rating,
  });
  renderHistory();
  renderMatches();
  say($("#q-status"), "Added ", bdi(item.title), `. ${state.history.length} in your history.`);
  if (focusSearch) $("#q").focus();
}

function renderHistory() {
  const list = $("#history");
  list.replaceChildren();
  state.history.forEach((entry, index) => {
    const li = document.createElement("li");
    li.dataset.itemId = entry.item_id;
    const text = document.createElement("div");
    text.className = "text";
    const [title, sub] = titleSpans(entry.title, subtitle(entry));
    text.append(title, SPACE, sub);
    if (!entry.year && !entry.genres) {
      itemDetails(entry.item_id).then((found) => {
        if (!found) return;
        entry.year = found.year;
        entry.genres = found.genres;
        sub.textContent = subtitle(entry);
      });
    }

    const id = `rating-${index}`;
    const label = document.createElement("label");
    label.className = "vh";
    label.htmlFor = id;
    say(label, "Your rating for ", bdi(entry.title));
    const select = document.createElement("select");
    select.id = id;
    select.className = "rating";
    for (const [value, name] of [["", "no rating"], ["5", "5 ★ loved"], ["4", "4 ★"], ["3", "3 ★"], ["2", "2 ★"], ["1", "1 ★ disliked"]]) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = name;
      select.append(option);
    }
    select.value = entry.rating == null ? "" : String(Math.round(entry.rating));
    select.addEventListener("change", () => {
      entry.rating = select.value === "" ? null : Number(select.value);
    });

    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${entry.title}`);
    remove.addEventListener("click", () => {
      const at = state.history.indexOf(entry);
      state.history.splice(at, 1);
      state.readWindow = null;
      renderHistory();
      renderMatches();
      say($("#q-status"), "Removed ", bdi(entry.title), ".");
      // Focus where the row was: the Remove of the row that took its place, else of the row
      // above (the last one was removed), else the search box (the history is empty).
      const buttons = document.querySelectorAll("#history .remove");
      (buttons[Math.min(at, buttons.length - 1)] || $("#q")).focus();
    });
    li.append(text, label, select, remove);
    list.append(li);
  });
  const n = state.history.length;
  $("#history-count").textContent = n ? `(${n})` : "";
  $("#history-empty").hidden = n > 0;
  markUnread();
}

// Mark, in words, the history rows the last answer's prompt did not show: the reasoning says
// nothing about them. Updated in place, so a focused rating or remove button keeps its focus.
function markUnread() {
  const read = state.readWindow;
  [...$("#history").children].forEach((li, index) => {
    const unread = !!read && read.unread.has(state.history[index]);
    li.classList.toggle("unread", unread);
    let mark = $(".unread-note", li);
    if (unread && !mark) {
      mark = document.createElement("span");
      mark.className = "unread-note";
      $(".text", li).append(mark);
    }
    if (mark) {
      mark.hidden = !unread;
      mark.textContent = unread ? `not read by the model: it reads the latest ${read.n}` : "";
    }
  });
}

async function loadUser(event) {
  event.preventDefault();
  const box = $("#history-error");
  const status = $("#user-status");
  const userId = $("#user-id").value.trim();
  showError(box, null);
  if (!userId) {
    state.userId = null;
    status.textContent = "No user id: recommendations use only the history above.";
    return;
  }
  say(status, "Loading ", bdi(userId), "’s history…");
  try {
    const body = await api(`/users/${encodeURIComponent(userId)}/history`);
    state.userId = userId;
    if (!body.history.length) {
      // keep what is on the page: it is what will be sent, and watched films start the user's history
      say(status, "User ", bdi(userId), " has no stored history yet; films you mark as watched are saved to it.");
      return;
    }
    const known = body.history.filter((h) => h.title != null);
    const gone = body.history.length - known.length;
    // The stored history is in timestamp order, oldest first. A film seen or rated more than
    // once keeps its LATEST event (the rating the user gives it now, and its timestamp), at the
    // latest event's place: re-inserting into a Map moves the key to the end.
    const latest = new Map();
    for (const h of known) {
      latest.delete(h.item_id);
      latest.set(h.item_id, h);
    }
    state.readWindow = null;
    state.history = [...latest.values()].map((h) => ({
      item_id: h.item_id,
      title: h.title,
      year: "",
      genres: "",
      rating: h.rating,
      timestamp: h.timestamp ?? null,
    }));
    renderHistory();
    renderMatches();
    const repeats = known.length - state.history.length;
    say(
      status,
      "User ",
      bdi(userId),
      `: ${state.history.length} films loaded` +
        (repeats ? `; ${repeats} earlier event${repeats === 1 ? "" : "s"} of a film seen again left out` : "") +
        (gone ? ` (${gone} no longer in the catalog).` : "."),
    );
  } catch (err) {
    status.textContent = "";
    showError(box, err);
    focusKey(err, $("#user-form"));
  }
}

// ------------------------------------------------------------------ one run
function newRun(title) {
  const node = $("#run-template").content.firstElementChild.cloneNode(true);
  $(".run-title", node).textContent = title;
  // the ranked list's name, for a screen reader's list of lists; two side by side differ
  $(".items", node).setAttribute("aria-label", `Recommended films, ${title.toLowerCase()}`);
  $("#runs").append(node);
  return {
    node,
    title,
    status: $(".run-status", node),
    error: $(".error", node),
    reasoningBox: $(".reasoning", node),
    reasoning: $(".reasoning-text", node),
    reasoningEnd: $(".reasoning-end", node),
    readNote: $(".read-note", node),
    note: $(".note", node),
    items: $(".items", node),
    meta: $(".meta", node),
  };
}

function requestBody(reasoning) {
  const body = { k: clampInt($("#k").value, 1, 100, 10), reasoning };
  const budget = $("#budget").value.trim();
  if (reasoning && budget !== "") body.max_reasoning_tokens = Number(budget);
  if (state.history.length) {
    // A stored event's timestamp goes with it: the request then says what the store says.
    body.history = state.history.map((h) => ({
      item_id: h.item_id,
      ...(h.rating == null ? {} : { rating: h.rating }),
      ...(h.timestamp == null ? {} : { timestamp: h.timestamp }),
    }));
  }
  if (state.userId) body.user_id = state.userId;
  if (!body.history && !body.user_id) body.history = []; // the API says what is missing
  return body;
}

function clampInt(value, lo, hi, fallback) {
  const n = Number.parseInt(value, 10);
  return Number.isFinite(n) ? Math.min(hi, Math.max(lo, n)) : fallback;
}

function appendReasoning(run, text) {
  if (!text) return;
  run.reasoningBox.hidden = false;
  run.reasoningText = (run.reasoningText || "") + text;
  say(run.reasoning, ...reasoningParts(run.reasoningText));
}

// The rationale format's sentences (model/rationale.py) whose entries are titles or genres, how
// their entries are separated and where each ends; an unclosed one (still streaming, or cut by
// the budget) runs to the end of the text so far.
const LISTS = [
  { open: "Rated highest: ", sep: /(; )/, end: /\.(?= Lately more| Next:| Picks:|$)/ },
  { open: "Picks: ", sep: /(; )/, end: /\.(?= Next:|$)/ },
  { open: "Likes ", sep: /(, | and )/, end: /, mostly|\./ },
  { open: "Lately more ", sep: null, end: /\.(?= Next:| Picks:|$)/ },
];

// The reasoning as text with each listed title and genre in a `bdi`: "Rated highest: وجدة;
// ואלס עם באשיר; Heat." showed its two right-to-left titles swapped, the "; " between them on the
// wrong side. Its textContent is the text, unchanged.
function reasoningParts(text) {
  const parts = [];
  let at = 0;
  for (;;) {
    let next = null;
    for (const list of LISTS) {
      const i = text.indexOf(list.open, at);
      if (i >= 0 && (next === null || i < next.i)) next = { i, list };
    }
    if (next === null) break;
    const start = next.i + next.list.open.length;
    parts.push(text.slice(at, start));
    const rest = text.slice(start);
    const end = rest.search(next.list.end);
    const body = end < 0 ? rest : rest.slice(0, end);
    const pieces = next.list.sep ? body.split(next.list.sep) : [body];
    pieces.forEach((piece, k) => {
      if (k % 2) parts.push(piece); // a separator (the split's captured group)
      else if (piece) parts.push(bdi(piece));
    });
    at = start + body.length;
  }
  parts.push(text.slice(at));
  return parts.filter((p) => p !== "");
}

function renderItems(run, items) {
  run.items.replaceChildren();
  for (const item of items) {
    const li = document.createElement("li");
    li.className = "item";
    li.dataset.itemId = item.item_id;
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = item.rank;
    rank.setAttribute("aria-hidden", "true");
    const text = document.createElement("div");
    text.className = "text";
    const [title, sub] = titleSpans(item.title);
    text.append(title, SPACE, sub);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${Number(item.score).toFixed(2)}`;
    score.title = "cos(h_T, h_v) / τ";
    const watched = document.createElement("button");
    watched.type = "button";
    watched.className = "watched";
    watched.textContent = "I watched this";
    // The name starts with the words on the button (WCAG 2.5.3: "click I watched this" works
    // by voice) and says which film, as ten buttons of one name would not.
    watched.setAttribute("aria-label", `I watched this: ${item.title}`);
    watched.addEventListener("click", () => markWatched(item, watched));
    const side = document.createElement("div");
    side.className = "side";
    side.append(score, watched);
    li.append(rank, text, side);
    run.items.append(li);
    itemDetails(item.item_id).then((found) => {
      if (found) sub.textContent = subtitle(found);
    });
  }
}

function renderMeta(run, info) {
  const t = info.timings || {};
  const s = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`);
  const parts = [];
  if (info.model_version) parts.push(`model ${info.model_version}`);
  if (info.cache) parts.push(`cache ${info.cache}`);
  if (info.reasoning_tokens) parts.push(`${info.reasoning_tokens} reasoning tokens`);
  if (t.total_ms != null) {
    // generate_ms is the model's time for the prompt and whatever it wrote: a run that wrote no
    // reasoning still spends it reading the prompt, and calling that "reasoning" misleads.
    const wrote = info.reasoning_tokens > 0 || hasReasoning(run);
    const detail = [
      t.queue_ms != null && `queue ${s(t.queue_ms)}`,
      t.generate_ms > 0 && `${wrote ? "reasoning" : "model"} ${s(t.generate_ms)}`,
      t.score_ms != null && `ranking ${s(t.score_ms)}`,
    ].filter(Boolean);
    parts.push(`${s(t.total_ms)}${detail.length ? ` (${detail.join(", ")})` : ""}`);
  }
  if (info.streamed != null) parts.push(info.streamed ? "streamed" : "not streamed");
  run.meta.textContent = parts.join(" · ");
}

// POST /recommend/stream: the answer's fields (items' and done's), or false when the route does
// not exist (404/405).
async function runStreamed(run, body, signal) {
  let response;
  try {
    response = await fetch("/recommend/stream", {
      method: "POST",
      headers: { "content-type": "application/json", accept: "text/event-stream", ...keyHeaders() },
      body: JSON.stringify(body),
      signal,
    });
  } catch (err) {
    // Once this server has streamed, a failed fetch means it is gone, not that the browser
    // cannot stream (runOne's fallback, for a first try only).
    if (err.name !== "AbortError" && state.stream === "yes") throw new ApiError(0, NO_ANSWER);
    throw err;
  }
  if (response.status === 404 || response.status === 405) {
    try {
      await response.body?.cancel();
    } catch {
      /* nothing to drain */
    }
    return false;
  }
  if (!response.ok) throw await refusal(response);
  const type = response.headers.get("content-type") || "";
  if (!type.includes("text/event-stream") || !response.body) {
    // A JSON answer from a server that does not stream: the /recommend shape.
    const answer = await response.json();
    showAnswer(run, answer, false);
    return answer;
  }
  state.stream = "yes";
  run.status.textContent = "Reasoning…";
  const info = { streamed: true };
  let gotItems = false;
  let failed = null;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err; // Cancel
      throw new ApiError(0, BROKE_OFF); // the connection dropped: the server died or restarted
    }
    const { value, done } = chunk;
    if (done) break;
    buffer += value;
    const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = blocks.pop();
    for (const block of blocks) {
      const { event, data } = parseEvent(block);
      if (data === null) continue;
      const payload = parseData(data);
      if (event === "reasoning") {
        appendReasoning(run, reasoningPiece(payload));
      } else if (event === "items") {
        const items = Array.isArray(payload) ? payload : payload.items || [];
        Object.assign(info, Array.isArray(payload) ? {} : payload);
        renderItems(run, items);
        gotItems = true;
        run.status.textContent = "";
      } else if (event === "done") {
        if (payload && typeof payload === "object" && !Array.isArray(payload)) {
          Object.assign(info, payload.timings || payload.model_version ? payload : { timings: payload });
        }
      } else if (event === "error") {
        const status = payload?.error?.status || payload?.status || 500;
        failed = new ApiError(status, failedWords(status, messageOf(payload) || "the stream reported an error"));
      }
    }
  }
  if (failed) throw failed;
  if (!gotItems) throw new ApiError(0, "The stream ended before the recommendations arrived.");
  // "wrote nothing" only where it was asked to write (a budget of 0 asks for nothing: cache "off")
  if (!run.reasoning.textContent && body.reasoning && info.cache !== "off") showNoReasoning(run);
  showReasoningCut(run, info);
  renderMeta(run, info);
  return info;
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return { event, data: data.length ? data.join("\n") : null };
}

function parseData(data) {
  try {
    return JSON.parse(data);
  } catch {
    return data;
  }
}

function reasoningPiece(payload) {
  if (typeof payload === "string") return payload;
  if (payload && typeof payload === "object") {
    for (const key of ["delta", "text", "token"]) {
      if (typeof payload[key] === "string") return payload[key];
    }
  }
  return payload == null ? "" : String(payload);
}

function messageOf(payload) {
  if (typeof payload === "string") return payload;
  if (payload && typeof payload === "object") {
    return payload.message || payload.error?.message || (typeof payload.detail === "string" ? payload.detail : null);
  }
  return null;
}

// True once reasoning text is on screen (not the "wrote nothing" placeholder).
function hasReasoning(run) {
  return !run.reasoningBox.hidden && !run.reasoning.classList.contains("muted") && !!run.reasoning.textContent;
}

// A line under the reasoning saying why it ends where it does (cut off, or out of budget).
function endReasoning(run, text) {
  run.reasoningEnd.textContent = text;
  run.reasoningEnd.hidden = false;
}

// A run that failed after part of its reasoning arrived: say the text is a fragment, so nobody
// reads it as the model's whole reasoning.
function markCutOff(run, cancelled) {
  if (!hasReasoning(run) || run.items.children.length) return;
  endReasoning(
    run,
    cancelled ? "(cut off: cancelled before the answer completed)" : "(cut off: the answer did not complete)",
  );
}

// reasoning_cut: the token budget ended the text, not the model; its last sentence may stop
// halfway, and a larger "Reasoning tokens" would let it finish.
function showReasoningCut(run, info) {
  if (!info.reasoning_cut || !hasReasoning(run)) return;
  const n = info.reasoning_tokens;
  endReasoning(
    run,
    `(stopped at the token budget${n ? ` of ${n} tokens` : ""}: the model had not finished; ` +
      "a larger “Reasoning tokens” lets it)",
  );
}

function showNoReasoning(run) {
  run.reasoningBox.hidden = false;
  run.reasoning.textContent = "(the model wrote nothing before ranking)";
  run.reasoning.classList.add("muted");
}

// The /recommend answer, whole: the reasoning first, then the items.
function showAnswer(run, answer, streamed) {
  if (answer.reasoning) appendReasoning(run, answer.reasoning);
  else if (answer.reasoning === "") showNoReasoning(run);
  renderItems(run, answer.items || []);
  showReasoningCut(run, answer);
  renderMeta(run, { ...answer, streamed });
  run.status.textContent = "";
}

async function runOne(run, body, signal) {
  run.note.hidden = body.reasoning;
  run.status.textContent = body.reasoning
    ? "Waiting for the model: it writes its reasoning first, then ranks the catalog."
    : "Waiting for the model: ranking straight from the history.";
  if (state.stream !== "no") {
    try {
      const info = await runStreamed(run, body, signal);
      if (info) return info;
    } catch (err) {
      if (err instanceof TypeError && state.stream === "unknown") {
        state.stream = "no"; // the browser could not stream this response
      } else {
        throw err;
      }
    }
    state.stream = "no";
  }
  run.status.textContent = body.reasoning
    ? "The model is reasoning, then ranking; the text appears when it is done."
    : "Ranking straight from the history…";
  const answer = await api("/recommend", { json: body, signal });
  showAnswer(run, answer, false);
  return answer;
}

// What the model read: its prompt shows only the latest read_items.length films of the history
// sent (read_items, oldest first), so the reasoning is about those alone. The rows are matched
// from the end, by position: right even where a film is in the history twice. Should the ids
// not line up (a server that reorders), by id.
function showReadWindow(run, answer, sent) {
  const read = answer && answer.read_items;
  if (!Array.isArray(read) || !sent || answer.history_source === "store") return;
  const skipped = sent.length - read.length;
  if (skipped <= 0) return; // every film was read
  // a film added or removed while the model ran: the rows are no longer the ones it was sent
  if (state.history.length !== sent.length || sent.some((e, i) => state.history[i] !== e)) return;
  const inOrder = read.every((id, i) => sent[skipped + i].item_id === id);
  const unread = inOrder ? sent.slice(0, skipped) : sent.filter((e) => !read.includes(e.item_id));
  state.readWindow = { unread: new Set(unread), n: read.length };
  markUnread();
  const who = hasReasoning(run) ? "The reasoning reads" : "The model reads";
  run.readNote.textContent =
    `${who} the latest ${read.length} of your ${sent.length} films: the ` +
    `${unread.length === 1 ? "older one is" : `${unread.length} older ones are`} marked “not read” in your history.`;
  run.readNote.hidden = false;
}

// ------------------------------------------------------------------ the ask button
// What the status line (a live region) says after "Done in 2.9 s." when a run ends: how many
// films each answer holds and the first, so a screen reader hears the result, not only that
// something finished. Visually hidden: the answer is on the screen for everyone else, and the
// line looks as it did. The reasoning is not read out as it streams (its box is no live
// region): only that it is there.
function answerWords(runs) {
  const answered = runs.filter((run) => run.items.children.length);
  const words = document.createElement("span");
  words.className = "vh";
  for (const run of answered) {
    const n = run.items.children.length;
    const first = $(".title", run.items).textContent;
    words.append(answered.length > 1 ? ` ${run.title}: ` : " ", `${n} film${n === 1 ? "" : "s"}`);
    if (hasReasoning(run)) words.append(" after the reasoning");
    words.append(", first ", bdi(first), ".");
  }
  return words;
}

// The Recommend button while a run is in flight: it says "Recommending…" and does nothing, but
// stays focusable (aria-disabled, not disabled): a disabled button drops the keyboard's focus to
// the top of the page.
function setBusy(button, busy) {
  if (busy) button.setAttribute("aria-disabled", "true");
  else button.removeAttribute("aria-disabled");
  button.textContent = busy ? "Recommending…" : "Recommend";
}

async function ask(event, intro = null) {
  event?.preventDefault();
  if (state.running) return;
  const compare = $("#compare").checked;
  const reasoning = $("#reasoning").checked;
  const modes = compare ? [false, true] : [reasoning]; // without first: it is the quick one
  const controller = new AbortController();
  state.running = controller;
  const button = $("#ask");
  const cancel = $("#cancel");
  const status = $("#run-status");
  setBusy(button, true);
  cancel.hidden = false;
  $("#runs").replaceChildren();
  $("#runs").classList.toggle("compare", compare);
  $("#results-panel").hidden = false;
  const elapsed = $("#elapsed");
  const started = performance.now();
  const tick = () => {
    const seconds = Math.round((performance.now() - started) / 1000);
    elapsed.textContent = seconds ? `${seconds} s` : "";
  };
  tick();
  const timer = setInterval(tick, 1000);
  if (intro) say(status, ...intro);
  else status.textContent = compare ? "Asking twice: without reasoning, then with." : "Asking the model.";
  state.readWindow = null; // this run's answer marks the history afresh
  markUnread();
  const sent = state.history.length ? [...state.history] : null; // the entries this run sends
  const runs = modes.map((withReasoning) => newRun(withReasoning ? "With reasoning" : "Without reasoning"));
  let failures = 0;
  let keyRefusal = null;
  try {
    for (let i = 0; i < modes.length; i++) {
      const run = runs[i];
      try {
        const answer = await runOne(run, requestBody(modes[i]), controller.signal);
        showReadWindow(run, answer, sent);
      } catch (err) {
        markCutOff(run, err.name === "AbortError");
        if (err.name === "AbortError") {
          run.status.textContent = "Cancelled.";
          failures++;
          break;
        }
        failures++;
        run.status.textContent = "";
        showError(run.error, err);
        if (err.forKey) keyRefusal = err;
        if (err instanceof ApiError && err.status >= 400 && err.status < 500) break; // same input, same answer
      }
    }
  } finally {
    clearInterval(timer);
    elapsed.textContent = "";
    state.running = null;
    setBusy(button, false);
    const cancelHadFocus = document.activeElement === cancel;
    cancel.hidden = true;
    if (cancelHadFocus) button.focus(); // hidden, it would drop the focus to the top of the page
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (failures) status.textContent = `Stopped after ${seconds} s.`;
    else say(status, `Done in ${seconds} s.`, answerWords(runs));
    for (const run of runs) {
      if (!run.items.children.length && run.error.hidden && !run.status.textContent) run.node.remove();
    }
    focusKey(keyRefusal, $("#ask-form"), $("#results-panel"));
  }
}

// Abort the run in flight (if any) and wait until its clean-up is done.
async function stopRunning() {
  if (!state.running) return;
  state.running.abort();
  while (state.running) await new Promise((resolve) => setTimeout(resolve, 20));
}

// "I watched this": save the event (for a stored user), add the film to the history and ask
// again. The button keeps the focus while the event is saved (aria-disabled, as Recommend), and
// keeps it after a failure; the new answer replaces it, so the focus then goes to the results'
// heading, from where Tab reaches the new answer.
async function markWatched(item, button) {
  if (button.getAttribute("aria-disabled") === "true") return;
  button.setAttribute("aria-disabled", "true");
  await stopRunning();
  const run = button.closest(".run");
  const errorBox = run ? $(".error", run) : $("#history-error");
  try {
    if (state.userId) {
      await api(`/users/${encodeURIComponent(state.userId)}/events`, {
        json: { events: [{ item_id: item.item_id }] },
      });
    }
  } catch (err) {
    showError(errorBox, err);
    button.removeAttribute("aria-disabled");
    focusKey(err, $("#results-panel"));
    return;
  }
  addToHistory(item, null);
  const intro = state.userId
    ? ["Saved ", bdi(item.title), " to user ", bdi(state.userId), "; asking again."]
    : ["Added ", bdi(item.title), " to your history; asking again."];
  if (document.activeElement === button || document.activeElement === document.body) $("#h-results").focus();
  await ask(null, intro);
}

// ------------------------------------------------------------------ wiring
function init() {
  const q = $("#q");
  q.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => search(q.value), 150);
  });
  q.addEventListener("keydown", onSearchKey);
  $("#matches").addEventListener("keydown", onMatchesKey);
  $("#user-form").addEventListener("submit", loadUser);
  $("#ask-form").addEventListener("submit", ask);
  $("#cancel").addEventListener("click", () => state.running?.abort());
  $("#compare").addEventListener("change", () => {
    $("#reasoning").disabled = $("#compare").checked;
  });
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  $("#key-row").hidden = !key.value;
  key.addEventListener("input", () => {
    key.removeAttribute("aria-invalid"); // set by a refusal (focusKey)
    if (key.value) sessionStorage.setItem(KEY_STORE, key.value);
    else sessionStorage.removeItem(KEY_STORE);
  });
  renderHistory();
  showServer();
}

document.addEventListener("DOMContentLoaded", init);
