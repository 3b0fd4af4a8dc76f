"""The neuron browser: a static HTML site that opens from disk (no server, no CDN, no network).

    write_browser(results, out)  ->  <out>/index.html

    <out>/index.html                     models and layers, links to layer lists and CRATE-vs-GPT comparisons,
                                         search by explanation text over every layer
    <out>/layer.html?m=A[,B]&l=L         sortable neuron lists (score per protocol, explanation, activity, max),
                                         several models side by side for the same layer
    <out>/neuron.html?m=A&l=L&n=I        one neuron: explanations and scores, scoring records with the simulated
                                         activations beside the true ones, top and random records shaded by activation
    <out>/data/index.js                  the catalogue
    <out>/data/<model>/<layer>.js        one layer's neuron list (small: scales to thousands of neurons)
    <out>/data/<model>/<layer>/<i>.js    one neuron's records, loaded only when its page opens

Data files are scripts that assign into `window.CB` (browsers refuse `fetch` of `file://` URLs, not `<script
src>`), written with `json.dumps(ensure_ascii=True)`. Pages build the DOM with `textContent`, never
`innerHTML`, so token text (`<script>`, `&amp;`, quotes, newlines) shows as written and never runs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.report.results import ModelResult, ReportError, discover, layer_sort_key, score_value
from crate.eval.report.tables import slug

TOP_RECORDS = 20
RANDOM_RECORDS = 10


def _num(x: Any, digits: int = 4) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _js(var: str, key: str | None, obj: Any) -> str:
    payload = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    # < > & as \u escapes too: the data stays inert even if someone inlines it into a page.
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    target = f"CB.{var}" if key is None else f"CB.{var}[{json.dumps(key)}]"
    return f"window.CB=window.CB||{{layers:{{}},neurons:{{}}}};{target}={payload};\n"


def _record(r: dict[str, Any]) -> dict[str, Any]:
    return {"tokens": [str(t) for t in r.get("tokens", [])], "acts": [_num(a) for a in r.get("activations", [])]}


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _records_dir(result: ModelResult, protocol: str) -> Path:
    short = result.path / "records-short"
    if protocol == "short-context" and short.is_dir():
        return short
    return result.path / "records"


def _lookup_tokens(record: dict[str, Any] | None, rid: str, n: int) -> list[str]:
    """Tokens of a scoring record named by its id ("top:1", "random:0", "quantile:3:2", "top3:25")."""
    if record is None:
        return ["?"] * n
    parts = str(rid).split(":")
    try:
        if parts[0] in ("top", "top3"):
            rec = record["most_positive_activation_records"][int(parts[1])]
        elif parts[0] == "random":
            rec = record["random_sample"][int(parts[1])]
        elif parts[0] == "quantile":
            rec = record["random_sample_by_quantile"][int(parts[1])][int(parts[2])]
        else:
            return ["?"] * n
    except (KeyError, IndexError, ValueError, TypeError):
        return ["?"] * n
    tokens = [str(t) for t in rec.get("tokens", [])]
    if len(tokens) > n:  # a record cut to its centre (e.g. the short-context protocol's top3)
        start = (len(tokens) - n) // 2
        tokens = tokens[start:start + n]
    return tokens + ["?"] * (n - len(tokens))


def _activity(result: ModelResult, layer: str) -> dict[int, float]:
    """Fraction of recorded tokens where each neuron is active (> 0), from the records cache if present."""
    cache = result.path / "records" / layer / "cache.npz"
    meta = _load_json(result.path / "records" / "meta.json") or {}
    if cache.is_file():
        try:
            with np.load(cache) as z:
                n_tokens = float(z["n_tokens"]) if "n_tokens" in z else float(meta.get("n_tokens") or 0)
                if "active_count" in z and n_tokens > 0:
                    counts = z["active_count"]
                    return {i: float(c) / n_tokens for i, c in enumerate(counts)}
        except (OSError, ValueError, KeyError):
            pass
    return {}


def _neuron_ids(result: ModelResult, layer: str) -> list[int]:
    ids: set[int] = set()
    rec_dir = result.path / "records" / layer
    if rec_dir.is_dir():
        ids |= {int(p.stem) for p in rec_dir.glob("*.json") if p.stem.isdigit()}
    for by_layer in result.scores.values():
        ids |= {int(r["neuron"]) for r in by_layer.get(layer, [])}
    return sorted(ids)


def _layers(result: ModelResult) -> list[str]:
    layers: set[str] = set()
    rec = result.path / "records"
    if rec.is_dir():
        layers |= {d.name for d in rec.iterdir() if d.is_dir() and any(d.glob("*.json"))}
    for by_layer in result.scores.values():
        layers |= set(by_layer)
    return sorted(layers, key=layer_sort_key)


def _model_ids(results: list[ModelResult]) -> list[str]:
    """Unique, path-safe ids: the folder name, prefixed with its parent's where names repeat."""
    names = [slug(r.path.name, "model", "-.") for r in results]
    ids = []
    for r, n in zip(results, names):
        ids.append(slug(f"{r.path.parent.name}-{n}", "model", "-.") if names.count(n) > 1 else n)
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):  # still equal (same parent name): number them
        seen[x] = seen.get(x, 0) + 1
        if seen[x] > 1:
            ids[i] = f"{x}-{seen[x]}"
    return ids


def write_browser(
    paths: list[str | Path] | list[ModelResult], out: str | Path, top: int = TOP_RECORDS, random: int = RANDOM_RECORDS,
) -> Path:
    """Write the site for the interpretability results under `paths` into `out`; returns index.html."""
    results = paths if paths and isinstance(paths[0], ModelResult) else discover(paths)[0]  # type: ignore[arg-type]
    results = [r for r in results if _layers(r)]
    if not results:
        raise ReportError(
            "no interpretability results with records or scores found: point `crate browse` at the output folder "
            "of `crate interpret` (it holds records/<layer>/<neuron>.json and scores/<protocol>/<layer>.jsonl)"
        )
    out = Path(out)
    from crate.provenance import check_owned, claim

    check_owned(out, "another --out")
    data = claim(out) / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    catalogue = []
    for mid, r in zip(_model_ids(results), results):
        protocols = list(r.scores)
        entry = {"id": mid, "name": r.name, "arch": r.arch, "size": r.size, "random_init": r.random_init,
                 "protocols": protocols, "path": str(r.path), "layers": []}
        for layer in _layers(r):
            neurons = _write_layer(r, mid, layer, protocols, data, top, random)
            scores = [n["scores"].get(protocols[0]) for n in neurons] if protocols else []
            scores = [s for s in scores if s is not None]
            entry["layers"].append({"layer": layer, "n": len(neurons), "n_scored": len(scores),
                                    "mean": _num(sum(scores) / len(scores)) if scores else None})
        catalogue.append(entry)
    (data / "index.js").write_text(_js("index", None, {"models": catalogue}), encoding="utf-8")
    for name, body in PAGES.items():
        (out / name).write_text(_page(body), encoding="utf-8")
    return out / "index.html"


def _write_layer(r: ModelResult, mid: str, layer: str, protocols: list[str], data: Path, top: int, random: int) -> list[dict]:
    by_protocol = {p: {int(row["neuron"]): row for row in r.scores[p].get(layer, [])} for p in protocols}
    activity = _activity(r, layer)
    neurons = []
    ndir = data / mid / layer
    ndir.mkdir(parents=True, exist_ok=True)
    for i in _neuron_ids(r, layer):
        record = _load_json(r.path / "records" / layer / f"{i}.json")
        top_recs = [_record(x) for x in (record or {}).get("most_positive_activation_records", [])]
        rand_recs = [_record(x) for x in (record or {}).get("random_sample", [])]
        max_act = max((a for rec in top_recs for a in rec["acts"] if a is not None), default=None)
        act = activity.get(i)
        if act is None and rand_recs:  # estimate from the uniformly random records
            vals = [a for rec in rand_recs for a in rec["acts"] if a is not None]
            act = sum(a > 0 for a in vals) / len(vals) if vals else None
        scores, explanation, scored = {}, "", {}
        for p in protocols:
            row = by_protocol[p].get(i)
            if row is None:
                continue
            scores[p] = _num(score_value(row) * 100)
            explanation = explanation or str(row.get("explanation") or "")
            scored[p] = _scored(row, r, layer, i, p, record)
        neurons.append({"n": i, "scores": scores, "explanation": explanation, "active": _num(act), "max": max_act})
        detail = {
            "model": mid, "layer": layer, "neuron": i, "max": max_act, "active": _num(act),
            "mean": _num((record or {}).get("mean")), "variance": _num((record or {}).get("variance")),
            "top": top_recs[:top], "random": rand_recs[:random], "scored": scored,
            "n_top": len(top_recs), "n_random": len(rand_recs),
        }
        (ndir / f"{i}.js").write_text(_js("neurons", f"{mid}/{layer}/{i}", detail), encoding="utf-8")
    (data / mid / f"{layer}.js").write_text(_js("layers", f"{mid}/{layer}", {"neurons": neurons}), encoding="utf-8")
    return neurons


def _scored(row: dict[str, Any], r: ModelResult, layer: str, i: int, protocol: str, record: dict | None) -> dict:
    if _records_dir(r, protocol) != r.path / "records":
        record = _load_json(_records_dir(r, protocol) / layer / f"{i}.json")
    true, expected = row.get("true_activations") or [], row.get("expected_activations") or []
    ids = row.get("record_ids") or [f"#{k}" for k in range(len(true))]
    recs = []
    for k, (t, e) in enumerate(zip(true, expected)):
        rid = ids[k] if k < len(ids) else f"#{k}"
        tokens = row["tokens"][k] if isinstance(row.get("tokens"), list) and k < len(row["tokens"]) else _lookup_tokens(record, rid, len(t))
        recs.append({"id": str(rid), "tokens": [str(x) for x in tokens], "true": [_num(x) for x in t],
                     "expected": [_num(x) for x in e]})
    return {"explanation": str(row.get("explanation") or ""), "score": _num(score_value(row) * 100), "records": recs,
            "note": str(row.get("score_note") or "")}


# --- the pages -------------------------------------------------------------------------------------------
CSS = """
:root{--fg:#1d2330;--muted:#667085;--line:#e4e7ec;--bg:#fff;--head:#f6f8fb;--crate:#1f6feb;--gpt:#d9480f;--sae:#2f9e44}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);margin:0;background:var(--bg)}
header{padding:10px 20px;border-bottom:1px solid var(--line);background:var(--head);display:flex;gap:16px;align-items:baseline}
header a{color:var(--fg);text-decoration:none;font-weight:600}main{padding:16px 20px}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:18px 0 8px}h3{font-size:14px;margin:12px 0 6px}
a{color:#1a56db}.muted{color:var(--muted)}.err{color:#b42318;font-weight:600}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:var(--head);cursor:pointer;user-select:none;position:sticky;top:0;white-space:nowrap}th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cols{display:flex;gap:16px;align-items:flex-start}.cols>section{flex:1;min-width:0}
.arch-crate{border-top:3px solid var(--crate)}.arch-gpt{border-top:3px solid var(--gpt)}.arch-gpt-sae{border-top:3px solid var(--sae)}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#eef2f6}
input[type=search]{padding:6px 8px;width:min(520px,100%);border:1px solid #c9ced6;border-radius:6px;font-size:14px}
.rec{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;line-height:1.9;margin:3px 0;padding:4px 6px;border:1px solid var(--line);border-radius:4px;overflow-wrap:anywhere}
.tok{white-space:pre;border-radius:2px;padding:1px 0}.lbl{display:inline-block;width:88px;color:var(--muted);font-family:system-ui,sans-serif;font-size:11px}
.pair{margin:6px 0 10px}.expl{font-size:15px;padding:8px 10px;background:#f5f8ff;border-left:3px solid var(--crate);margin:6px 0}
.stats span{margin-right:16px}
tr.arch-row-crate td:first-child{border-left:3px solid var(--crate)}tr.arch-row-gpt td:first-child{border-left:3px solid var(--gpt)}tr.arch-row-gpt-sae td:first-child{border-left:3px solid var(--sae)}
"""

COMMON_JS = r"""
const CB = window.CB = window.CB || {layers:{}, neurons:{}};
const $ = (s) => document.querySelector(s);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else if (k === 'href') e.href = v; else if (k === 'title') e.title = v;
    else if (k === 'style') e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? '' : String(k)));
  return e;
}
function loadScript(src) {
  return new Promise((ok, fail) => {
    const s = document.createElement('script');
    s.src = src; s.onload = ok; s.onerror = () => fail(new Error('missing data file ' + src));
    document.head.append(s);
  });
}
const params = new URLSearchParams(location.search);
const fmt = (x, d=2) => (x == null || Number.isNaN(x)) ? '-' : Number(x).toFixed(d);
const pct = (x) => x == null ? '-' : (100 * x).toFixed(1) + '%';
function model(id) { return CB.index.models.find((m) => m.id === id); }
function layerUrl(ids, layer) { return 'layer.html?m=' + encodeURIComponent(ids.join(',')) + '&l=' + encodeURIComponent(layer); }
function neuronUrl(id, layer, n) { return 'neuron.html?m=' + encodeURIComponent(id) + '&l=' + encodeURIComponent(layer) + '&n=' + n; }
function fail(e) { $('#main').append(el('p', {class: 'err'}, String(e.message || e))); }
function loadLayer(id, layer) { return loadScript('data/' + id + '/' + layer + '.js').then(() => CB.layers[id + '/' + layer]); }
function shade(tok, a, max, rgb) {
  const f = (a == null || !(max > 0)) ? 0 : Math.max(0, Math.min(1, a / max));
  const shown = tok.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5');
  return el('span', {class: 'tok', title: (a == null ? 'n/a' : Number(a).toPrecision(3)) + '  ' + JSON.stringify(tok),
    style: 'background:rgba(' + rgb + ',' + f.toFixed(3) + ')'}, shown);
}
"""

INDEX_JS = r"""
function start() {
  const main = $('#main');
  const models = CB.index.models;
  main.append(el('h1', {}, 'Neuron browser'));
  main.append(el('p', {class: 'muted'}, models.length + ' model(s). Scores are Pearson correlations x100 between true and simulated activations.'));
  const q = el('input', {type: 'search', id: 'search', placeholder: 'Search explanations (e.g. "comma", "names")'});
  main.append(q, el('div', {id: 'hits'}));
  const bySize = {};
  for (const m of models) (bySize[m.size] = bySize[m.size] || []).push(m);
  for (const [size, ms] of Object.entries(bySize)) {
    main.append(el('h2', {}, 'Size ' + size));
    const t = el('table', {class: 'models'}, el('tr', {}, el('th', {}, 'model'), el('th', {}, 'arch'), el('th', {}, 'weights'),
      el('th', {}, 'layer'), el('th', {}, 'neurons'), el('th', {}, 'scored'), el('th', {}, 'mean score'), el('th', {}, 'compare')));
    for (const m of ms) {
      for (const L of m.layers) {
        const others = ms.filter((o) => o !== m && o.arch !== m.arch && o.random_init === m.random_init && o.layers.some((x) => x.layer === L.layer));
        const cmp = others.length ? el('a', {href: layerUrl([m.id, ...others.map((o) => o.id)], L.layer)}, 'side by side with ' + others.map((o) => o.name).join(', ')) : '';
        t.append(el('tr', {class: 'arch-row-' + m.arch}, el('td', {}, m.name), el('td', {}, el('span', {class: 'badge'}, m.arch)),
          el('td', {}, m.random_init ? 'random init (control)' : 'trained'),
          el('td', {}, el('a', {href: layerUrl([m.id], L.layer)}, 'layer ' + L.layer)), el('td', {class: 'num'}, L.n),
          el('td', {class: 'num'}, L.n_scored), el('td', {class: 'num'}, fmt(L.mean) + (m.protocols[0] ? ' (' + m.protocols[0] + ')' : '')), el('td', {}, cmp)));
      }
    }
    main.append(t);
  }
  let timer = null;
  q.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(() => search(q.value), 150); });
}
let allLoaded = null;
function loadAll() {
  if (!allLoaded) allLoaded = Promise.all(CB.index.models.flatMap((m) => m.layers.map((L) => loadLayer(m.id, L.layer))));
  return allLoaded;
}
function search(text) {
  const hits = $('#hits'); hits.replaceChildren();
  const words = text.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) return;
  loadAll().then(() => {
    const rows = [];
    for (const m of CB.index.models) for (const L of m.layers) {
      for (const n of (CB.layers[m.id + '/' + L.layer] || {neurons: []}).neurons) {
        const e = (n.explanation || '').toLowerCase();
        if (words.every((w) => e.includes(w))) rows.push([m, L.layer, n]);
      }
    }
    rows.sort((a, b) => (score(b[2]) - score(a[2])));
    const t = el('table', {id: 'hit-table'}, el('tr', {}, el('th', {}, 'model'), el('th', {}, 'layer'), el('th', {}, 'neuron'), el('th', {}, 'score'), el('th', {}, 'explanation')));
    for (const [m, layer, n] of rows.slice(0, 300)) t.append(el('tr', {}, el('td', {}, m.name), el('td', {}, layer),
      el('td', {}, el('a', {href: neuronUrl(m.id, layer, n.n)}, '#' + n.n)), el('td', {class: 'num'}, fmt(score(n))), el('td', {}, n.explanation)));
    hits.replaceChildren(el('p', {class: 'muted'}, rows.length + ' neuron(s) match' + (rows.length > 300 ? ' (first 300 shown)' : '')), t);
  }).catch(fail);
}
function score(n) { const v = Object.values(n.scores)[0]; return v == null ? -1e9 : v; }
loadScript('data/index.js').then(start).catch(fail);
"""

LAYER_JS = r"""
const LIMIT = 1000;
function start() {
  const ids = (params.get('m') || '').split(',').filter(Boolean), layer = params.get('l');
  const ms = ids.map(model);
  if (!ms.length || ms.some((m) => !m)) throw new Error('unknown model ' + params.get('m'));
  document.title = 'Layer ' + layer + ' - ' + ms.map((m) => m.name).join(' vs ');
  const main = $('#main');
  main.append(el('h1', {}, 'Layer ' + layer + ': ' + ms.map((m) => m.name).join(' vs ')));
  const q = el('input', {type: 'search', id: 'filter', placeholder: 'Filter by explanation text'});
  main.append(q);
  const cols = el('div', {class: 'cols'}); main.append(cols);
  const tables = [];
  Promise.all(ms.map((m) => loadLayer(m.id, layer))).then((datas) => {
    ms.forEach((m, k) => {
      const sec = el('section', {class: 'arch-' + m.arch});
      sec.append(el('h2', {}, m.name + ' ', el('span', {class: 'badge'}, m.arch + ', ' + datas[k].neurons.length + ' neurons')));
      const tbl = new NeuronTable(m, layer, datas[k].neurons); tables.push(tbl);
      sec.append(tbl.node); cols.append(sec);
    });
    q.addEventListener('input', () => tables.forEach((t) => t.filter(q.value)));
  }).catch(fail);
}
class NeuronTable {
  constructor(m, layer, neurons) {
    this.m = m; this.layer = layer; this.all = neurons; this.rows = neurons; this.key = 'score0'; this.dir = -1; this.showAll = false;
    this.cols = [['n', 'neuron'], ...m.protocols.map((p, i) => ['score' + i, 'score ' + p]), ['active', 'active'], ['max', 'max act'], ['explanation', 'explanation']];
    this.node = el('div'); this.sort(this.key, this.dir);
  }
  value(n, key) {
    if (key.startsWith('score')) { const v = n.scores[this.m.protocols[+key.slice(5)]]; return v == null ? null : v; }
    return n[key];
  }
  sort(key, dir) {
    this.key = key; this.dir = dir;
    this.rows = [...this.rows].sort((a, b) => {
      const x = this.value(a, key), y = this.value(b, key);
      if (x == null) return y == null ? 0 : 1; if (y == null) return -1;
      return (typeof x === 'string' ? x.localeCompare(y) : x - y) * dir;
    });
    this.render();
  }
  filter(text) {
    const words = text.toLowerCase().split(/\s+/).filter(Boolean);
    this.rows = this.all.filter((n) => words.every((w) => (n.explanation || '').toLowerCase().includes(w)));
    this.sort(this.key, this.dir);
  }
  render() {
    const head = el('tr');
    for (const [key, name] of this.cols) {
      const th = el('th', {class: key === this.key ? (this.dir > 0 ? 'sorted-asc' : 'sorted-desc') : '', 'data-key': key}, name);
      th.addEventListener('click', () => this.sort(key, key === this.key ? -this.dir : (key === 'n' || key === 'explanation' ? 1 : -1)));
      head.append(th);
    }
    const t = el('table', {class: 'neurons'}, head);
    const shown = this.showAll ? this.rows : this.rows.slice(0, LIMIT);
    const frag = document.createDocumentFragment();
    for (const n of shown) {
      const tr = el('tr', {}, el('td', {}, el('a', {href: neuronUrl(this.m.id, this.layer, n.n)}, '#' + n.n)));
      this.m.protocols.forEach((p) => tr.append(el('td', {class: 'num'}, fmt(n.scores[p]))));
      tr.append(el('td', {class: 'num'}, pct(n.active)), el('td', {class: 'num'}, fmt(n.max, 3)), el('td', {}, n.explanation));
      frag.append(tr);
    }
    t.append(frag);
    const kids = [t];
    if (shown.length < this.rows.length) {
      const b = el('button', {}, 'show all ' + this.rows.length);
      b.addEventListener('click', () => { this.showAll = true; this.render(); });
      kids.push(b);
    }
    this.node.replaceChildren(...kids);
  }
}
loadScript('data/index.js').then(start).catch(fail);
"""

NEURON_JS = r"""
const GREEN = '34,160,70', BLUE = '31,111,235';
function recordLine(label, tokens, acts, max, rgb) {
  const div = el('div', {class: 'rec'}, el('span', {class: 'lbl'}, label));
  tokens.forEach((t, i) => div.append(shade(t, acts[i], max, rgb)));
  return div;
}
function start() {
  const id = params.get('m'), layer = params.get('l'), n = +params.get('n');
  const m = model(id);
  if (!m) throw new Error('unknown model ' + id);
  document.title = m.name + ' layer ' + layer + ' neuron ' + n;
  const main = $('#main');
  const others = CB.index.models.filter((o) => o !== m && o.size === m.size && o.arch !== m.arch && o.random_init === m.random_init && o.layers.some((x) => x.layer === layer));
  const nav = el('p', {}, el('a', {href: layerUrl([m.id], layer)}, '\u2190 layer ' + layer), ' \u00b7 ',
    el('a', {href: neuronUrl(id, layer, n - 1)}, 'previous'), ' \u00b7 ', el('a', {href: neuronUrl(id, layer, n + 1)}, 'next'));
  if (others.length) nav.append(' \u00b7 ', el('a', {href: layerUrl([m.id, ...others.map((o) => o.id)], layer)}, 'layer ' + layer + ' side by side'));
  main.append(nav, el('h1', {}, m.name + ' \u00b7 layer ' + layer + ' \u00b7 neuron ' + n + ' ', el('span', {class: 'badge'}, m.arch)));
  loadScript('data/' + id + '/' + layer + '/' + n + '.js').then(() => {
    const d = CB.neurons[id + '/' + layer + '/' + n];
    main.append(el('p', {class: 'stats'}, el('span', {}, 'max activation ' + fmt(d.max, 3)), el('span', {}, 'active on ' + pct(d.active) + ' of tokens'),
      el('span', {}, 'mean ' + fmt(d.mean, 4)), el('span', {}, 'variance ' + fmt(d.variance, 4))));
    for (const [p, s] of Object.entries(d.scored)) {
      const sec = el('section', {class: 'scored', 'data-protocol': p});
      sec.append(el('h2', {}, p + ': score ' + fmt(s.score) + (s.note ? ' (' + s.note + ')' : '')));
      sec.append(el('div', {class: 'expl'}, s.explanation || '(no explanation)'));
      const maxT = Math.max(0, ...s.records.flatMap((r) => r.true.filter((x) => x != null)));
      const maxE = Math.max(0, ...s.records.flatMap((r) => r.expected.filter((x) => x != null)));
      sec.append(el('p', {class: 'muted'}, 'Scoring records: true activations (green) and the simulator\'s expected activations from the explanation alone (blue).'));
      for (const r of s.records) {
        sec.append(el('div', {class: 'pair'}, recordLine('true ' + r.id, r.tokens, r.true, maxT, GREEN),
          recordLine('simulated', r.tokens, r.expected, maxE, BLUE)));
      }
      main.append(sec);
    }
    const maxA = d.max || 0;
    const top = el('section', {id: 'top-records'}, el('h2', {}, 'Top-activating records (' + d.top.length + ' of ' + d.n_top + ')'));
    d.top.forEach((r, i) => top.append(recordLine('top ' + i, r.tokens, r.acts, maxA, GREEN)));
    const rnd = el('section', {id: 'random-records'}, el('h2', {}, 'Random records (' + d.random.length + ' of ' + d.n_random + ')'));
    d.random.forEach((r, i) => rnd.append(recordLine('random ' + i, r.tokens, r.acts, maxA, GREEN)));
    main.append(top, rnd);
  }).catch(fail);
}
loadScript('data/index.js').then(start).catch(fail);
"""

PAGES = {"index.html": INDEX_JS, "layer.html": LAYER_JS, "neuron.html": NEURON_JS}


def _page(script: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        "<link rel=\"icon\" href=\"data:,\"><title>crate-lm neuron browser</title>"
        f"<style>{CSS}</style></head><body>"
        "<header><a href=\"index.html\">crate-lm neuron browser</a><span class=\"muted\">CRATE vs GPT neurons: "
        "records, explanations, simulations, scores</span></header><main id=\"main\"></main>"
        f"<script>{COMMON_JS}\n{script}</script></body></html>\n"
    )


def serve(directory: str | Path, port: int = 8000) -> None:
    """Serve the site on http://127.0.0.1:<port>/ until interrupted."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as httpd:
        print(f"serving {directory} at http://127.0.0.1:{port}/index.html (Ctrl-C stops)")
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
