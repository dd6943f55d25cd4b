"""A browsable documentation site without Quarto: `python tools/site.py [--out _site]`.

nbdev's own processing (`nbdev.serve.proc_nbs`, the step `nbdev_docs` runs before Quarto) turns the notebooks into
documentation notebooks in `_proc/`: `show_doc` output for every exported name, hidden cells removed, names in backticks
linked. This script renders those to static HTML with a navigation sidebar on every page: the home page (index), the
tutorials with their committed outputs, and the module pages. It works offline: figures are embedded, images copied,
links to other pages made relative, links to files of the repository outside `nbs/` pointed at the repository on
GitHub (`git_url` of settings.ini) when the file exists. `nbdev_docs` (with Quarto) is unchanged and still works.
`tests/test_site.py` builds the site and checks it in headless Chromium for broken links and missing images.

Needs the dev extras (`pip install -e ".[dev]"`: nbdev, and mistune, Pygments and PyYAML that come with it); without them it
says so and exits with status 2. The sidebar lists the tutorials in learning order (`TUTORIAL_ORDER`), the reference pages
in module order. A tutorial's quick settings and the `#| slow` cell with its full-run settings right after them show as one
code block with a switch between the two (`switch_pairs`), not as two cells in a row."""
import argparse, ast, html, importlib.util, json, re, shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# modules this script needs beyond the library's own requirements: all come with the dev extras
NEEDS = dict(nbdev='nbdev', execnb='execnb', mistune='mistune (through nbconvert)', pygments='Pygments', yaml='PyYAML')

# The tutorials in the order a reader takes them (the README's order): the problem, the fix, one's own model, every method,
# then the tools and the scale-ups. A tutorial not named here comes last; tests/test_site.py asserts that none is missing.
TUTORIAL_ORDER = ['fragile', 'train_robust', 'audit_your_model', 'methods', 'explorer', 'distributed', 'localization',
                  'reproduction']


def missing_requirements():
    "The modules of `NEEDS` that cannot be imported, as the packages to install."
    return [pkg for mod, pkg in NEEDS.items() if importlib.util.find_spec(mod) is None]

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;display:flex;color:#222;line-height:1.5}
nav{width:15rem;flex:none;padding:1rem;background:#f6f7f9;border-right:1px solid #ddd;height:100vh;position:sticky;top:0;overflow:auto;font-size:.9rem}
nav h2{font-size:.8rem;text-transform:uppercase;color:#666;margin:1.2rem 0 .3rem} nav ul{list-style:none;padding:0;margin:0}
nav li{margin:.15rem 0} nav a{color:#1a5fb4;text-decoration:none} nav a.here{font-weight:bold;color:#000}
main{max-width:58rem;padding:1rem 2rem 4rem;min-width:0} pre{background:#f6f8fa;padding:.6rem;overflow:auto;font-size:.85rem}
.output pre{background:#fff;border-left:3px solid #ddd} .output img{max-width:100%} img{max-width:100%}
table{border-collapse:collapse;font-size:.85rem} td,th{border:1px solid #ddd;padding:.2rem .5rem}
.description{font-size:1.15rem;color:#555} .source{float:right;font-size:smaller} code{background:#f2f2f2;padding:0 .2rem}
.widget-note{color:#777;font-style:italic} hr{border:0;border-top:1px solid #ddd;margin:2rem 0 1rem}
.switch{margin:1rem 0} .switch input{position:absolute;opacity:0} .switch label{display:inline-block;padding:.2rem .7rem;
border:1px solid #ddd;border-bottom:0;border-radius:.3rem .3rem 0 0;font-size:.85rem;color:#555;cursor:pointer;background:#f6f7f9}
.switch input:checked+label{background:#f6f8fa;color:#000;font-weight:bold} .switch input:focus-visible+label{outline:2px solid #1a5fb4}
.switch pre{display:none;margin-top:0} .switch input.quick:checked~pre.quick,.switch input.full:checked~pre.full{display:block}
"""


def _cfg():
    from nbdev.config import get_config
    return get_config(path=ROOT)


def _worker(pairs):
    "In a worker process: nbdev's processing (`nbdev.serve_drv.main`) of each `(notebook, destination)`; the failures as text."
    import nbdev.serve_drv
    from nbdev.processors import FilterDefaults
    errors = []
    for src, dst in pairs:
        try: nbdev.serve_drv.main((Path(src), Path(dst), FilterDefaults))
        except Exception as e:
            errors.append(f"{Path(src).relative_to(ROOT)}: {' '.join(str(e).split())[:300]}")
            try: _unprocessed(Path(src), Path(dst))
            except Exception as e: errors.append(f"{Path(src).relative_to(ROOT)}: even with imports in cells of their own: {' '.join(str(e).split())[:200]}")
    return errors


def _split_imports(cell):
    "A code cell that mixes imports with other code as two cells, the imports first (nbdev's FAQ), or None if it does not."
    import ast
    src = ''.join(cell['source'])
    try: body = ast.parse(src).body
    except SyntaxError: return None
    imp = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if not imp or len(imp) == len(body): return None
    lines = src.splitlines(keepends=True)
    keep = {i for n in imp for i in range(n.lineno - 1, n.end_lineno)}
    directives = [l for l in lines if l.startswith('#|')]
    first = dict(cell, source=''.join(directives + [l for i, l in enumerate(lines) if i in keep]), outputs=[])
    return [first, dict(cell, source=''.join(l for i, l in enumerate(lines) if i not in keep))]


def _unprocessed(src, dst):
    "Process a notebook nbdev could not, after splitting its cells that mix imports with other code (nbdev runs those whole)."
    import tempfile, nbdev.serve_drv
    from nbdev.processors import FilterDefaults
    nb = json.loads(src.read_text())
    nb['cells'] = [d for c in nb['cells'] for d in ((_split_imports(c) if c['cell_type'] == 'code' else None) or [c])]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)/src.name
        tmp.write_text(json.dumps(nb))
        nbdev.serve_drv.main((tmp, dst, FilterDefaults))


def process(n_workers=2):
    """nbdev's documentation processing of every notebook into `_proc/` (what `nbdev_docs` hands to Quarto, as
    `nbdev.serve.proc_nbs` does it), in `n_workers` processes, each notebook on its own; returns `(folder, failures)`."""
    import subprocess
    from nbdev.doclinks import nbglob
    from nbdev.serve import _proc_file
    from fastcore.xtras import working_directory
    cfg = _cfg()
    cache, path = cfg.config_path/'_proc', cfg.nbs_path
    if cache.exists(): shutil.rmtree(cache)
    cache.mkdir(parents=True)
    with working_directory(ROOT):
        items = [x for f in nbglob(path, func=Path, file_glob='', file_re='') if (x := _proc_file(f, cache=cache, path=path))]
        for f in path.rglob('*'):  # the images and other files next to the notebooks
            if f.is_file() and f.suffix != '.ipynb': _proc_file(f, cache=cache, path=path)
    chunks = [[[str(s), str(d)] for s, d, _ in items[i::max(n_workers, 1)]] for i in range(max(n_workers, 1))]
    procs = [subprocess.Popen([sys.executable, __file__, '--worker'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT) for c in chunks]
    errors = []
    for p, c in zip(procs, chunks):
        p.stdin.write(json.dumps(c)); p.stdin.close()
    for p, c in zip(procs, chunks):
        out = p.stdout.read(); p.wait()
        last = out.strip().splitlines()[-1] if out.strip() else ''
        try: errors += json.loads(last)
        except json.JSONDecodeError: errors.append(f"a worker processing {[Path(s).name for s, _ in c]} ended with status {p.returncode}")
    return cache, errors


def _frontmatter(cell):
    "title, description and output-file from a processed notebook's raw frontmatter cell."
    import yaml
    src = ''.join(cell['source']).strip()
    return yaml.safe_load(src.strip('-')) if src.startswith('---') else {}


def _markdown(text):
    "Markdown to HTML (mistune, which nbconvert uses), with Quarto's `{...}` attributes dropped."
    import mistune
    text = re.sub(r'\]\(([^)\s]+)\)\{[^}]*\}', r'](\1)', text)
    return mistune.html(text)


def _slug(text):
    "Quarto's heading id: lower case, spaces to '-', only letters, digits, '_', '-' and '.'."
    return re.sub(r'[^a-z0-9_.\-]', '', re.sub(r'\s+', '-', html.unescape(re.sub(r'<[^>]+>', '', text)).strip().lower()))


def _ids(body):
    "Give each heading its Quarto id, so nbdev's links (`page.html#name`) land on it."
    return re.sub(r'<h([1-6])>(.*?)</h\1>', lambda m: f'<h{m[1]} id="{_slug(m[2])}">{m[2]}</h{m[1]}>', body, flags=re.S)


def _code(src):
    "A code cell's source without `#|` lines, highlighted."
    from pygments import highlight
    from pygments.lexers import PythonLexer
    from pygments.formatters import HtmlFormatter
    src = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
    return highlight(src, PythonLexer(), HtmlFormatter(nowrap=True)) if src else ''


def _output(o):
    "One cell output as HTML."
    if o['output_type'] == 'stream': return f"<pre>{html.escape(''.join(o['text']))}</pre>"
    if o['output_type'] == 'error': return f"<pre>{html.escape(o.get('ename', '') + ': ' + o.get('evalue', ''))}</pre>"
    d = o.get('data', {})
    if 'image/png' in d: return f'<img alt="figure" src="data:image/png;base64,{"".join(d["image/png"]).strip()}">'
    if 'image/svg+xml' in d: return ''.join(d['image/svg+xml'])
    if 'application/vnd.jupyter.widget-view+json' in d:
        return '<p class="widget-note">(an interactive widget: it runs in a notebook or with <code>robust_attr explore</code>)</p>'
    if 'text/html' in d: return ''.join(d['text/html'])
    if 'text/markdown' in d: return _markdown(''.join(d['text/markdown']))
    if 'text/plain' in d: return f"<pre>{html.escape(''.join(d['text/plain']))}</pre>"
    return ''


def _assigned(src):
    "The names a cell of plain assignments sets (`a, b = 1, 2`), directives ignored; None if the cell does anything else."
    try: body = ast.parse(src).body
    except SyntaxError: return None
    if not body or not all(isinstance(n, ast.Assign) for n in body): return None
    return {t.id for n in body for tgt in n.targets for t in ast.walk(tgt) if isinstance(t, ast.Name)}


def _slow(src): return bool(re.search(r'^#\|\s*slow\b', src, re.M))


def switch_pairs(cells):
    """Indices `i` where cell `i` sets the quick run's settings and cell `i+1` is a `#| slow` cell that sets some of the same
    names for the full run: the two sides of one switch (nbdev_test runs the first; `--flags slow` runs both, the second last)."""
    pairs = []
    for i, (a, b) in enumerate(zip(cells, cells[1:])):
        if a['cell_type'] != 'code' or b['cell_type'] != 'code': continue
        sa, sb = ''.join(a['source']), ''.join(b['source'])
        if _slow(sa) or not _slow(sb) or a.get('outputs') or b.get('outputs'): continue
        quick, full = _assigned(sa), _assigned(sb)
        if quick and full and full <= quick: pairs.append(i)
    return pairs


def _bare(src):
    "A cell's source without its `#|` directives (nbdev's processing drops them), stripped."
    return '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith('#|')).strip()


def switch_sources(cells):
    "`(quick, full)` sources, without directives, of each switch among a notebook's cells (`switch_pairs`)."
    return [(_bare(''.join(cells[i]['source'])), _bare(''.join(cells[i+1]['source']))) for i in switch_pairs(cells)]


def _switch(quick, full, n):
    "The two sides of a switch as one block: a tab for the quick run (this page's outputs) and one for the full run."
    tab = lambda side, label, checked: (f'<input type="radio" name="switch{n}" id="switch{n}-{side}" class="{side}"{" checked" if checked else ""}>'
                                        f'<label for="switch{n}-{side}">{label}</label>')
    return (f'<div class="switch">{tab("quick", "quick run (the outputs on this page)", True)}'
            f'{tab("full", "full run (<code>#| slow</code>: <code>--flags slow</code>)", False)}'
            f'<pre class="code quick">{_code("".join(quick["source"]))}</pre><pre class="code full">{_code("".join(full["source"]))}</pre></div>')


def _cells(cells, switches=None):
    """A page's cells as HTML, each switch's two sides as one block. `switches`: the `switch_sources` of the notebook the
    cells come from (nbdev's processing has removed the `#| slow` that tells them), None to find them in `cells`."""
    switches = set(switch_sources(cells) if switches is None else switches)
    code = lambda c: c['cell_type'] == 'code'
    out, skip = [], False
    for i, c in enumerate(cells):
        if skip: skip = False; continue
        nxt = cells[i+1] if i + 1 < len(cells) else None
        if nxt and code(c) and code(nxt) and (_bare(''.join(c['source'])), _bare(''.join(nxt['source']))) in switches:
            out.append(_switch(c, nxt, i)); skip = True
        else: out.append(_cell(c))
    return ''.join(out)


def _cell(c):
    if c['cell_type'] == 'markdown': return _markdown(''.join(c['source']))
    if c['cell_type'] != 'code': return ''
    src = ''.join(c['source'])
    echo = not re.search(r'^#\|\s*echo:\s*false', src, re.M)
    out = ''.join(_output(o) for o in c.get('outputs', []))
    return (f'<pre class="code">{_code(src)}</pre>' if echo and _code(src) else '') + (f'<div class="output">{out}</div>' if out else '')


def _pages(proc):
    "{processed notebook: (html path relative to the site, title, description)} for every page."
    pages = {}
    for nb in sorted(proc.rglob('*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        fm = _frontmatter(cells[0]) if cells and cells[0]['cell_type'] == 'raw' else {}
        out = nb.relative_to(proc).parent/fm.get('output-file', nb.with_suffix('.html').name)
        pages[nb] = (out.as_posix(), fm.get('title', nb.stem), fm.get('description', ''))
    return pages


def _base(cfg): return f"{cfg.doc_host.rstrip('/')}{cfg.doc_baseurl.rstrip('/')}/"


def _rel(target, start):
    "Path `target` relative to the folder of page `start` (both relative to the site root)."
    import os.path
    return os.path.relpath(target, Path(start).parent.as_posix() or '.')


def _doc_links(body, base, ids):
    """nbdev links every name in backticks, including private names and methods that have no documentation of their own:
    a private name keeps its text only; `Class.method` without a heading of its own points at `method`'s or `Class`'s."""
    def fix(m):
        target, _, frag = html.unescape(m[1])[len(base):].partition('#')
        have = ids.get(target, set())
        if not frag or frag in have: return m[0]
        if frag.startswith('_'): return m[2]
        owner, _, name = frag.rpartition('.')
        alt = next((a for a in (name, owner) if a and a in have), None)
        return m[0] if alt is None else f'<a href="{html.escape(base + target + "#" + alt)}">{m[2]}</a>'
    return re.sub(rf'<a href="({re.escape(base)}[^"]*)">(.*?)</a>', fix, body, flags=re.S)


def _links(body, page, nb_src, by_src, cfg):
    "Rewrite a page's links for the static site: notebooks to pages, the doc host to relative paths, repository files to GitHub."
    base = _base(cfg)
    def fix(m):
        attr, url = m[1], html.unescape(m[2])
        if url.startswith(base): return f'{attr}="{html.escape(_rel(url[len(base):], page))}"'
        if re.match(r'^[a-z]+:|^#|^data:', url): return m[0]
        path, _, frag = url.partition('#')
        target = (nb_src.parent/path).resolve()
        if not target.exists() and (ROOT/path).exists(): target = (ROOT/path).resolve()  # the README's links, from the root
        if target.suffix == '.ipynb' and target in by_src: new = _rel(by_src[target], page)
        elif target.is_relative_to(ROOT/'nbs'): new = _rel(target.relative_to(ROOT/'nbs').as_posix(), page)  # a file of the site
        elif target.exists() and target.is_relative_to(ROOT):
            new = f"{cfg.git_url.rstrip('/')}/blob/{cfg.branch}/{target.relative_to(ROOT).as_posix()}"
        else: return m[0]  # left as it is: the link check reports it
        return f'{attr}="{html.escape(new + ("#" + frag if frag else ""))}"'
    return re.sub(r'\b(href|src)="([^"]*)"', fix, body)


def nav_order(out, notebook):
    """Where page `out` (its path in the site) from `notebook` (its file name) goes in the sidebar: the home page, the
    tutorials in learning order, then the modules in the order of their notebooks (00_core, 01_smooth, ...)."""
    p = Path(out)
    if out == 'index.html': return (0, 0, '')
    if p.parts[0] == 'tutorials':
        return (1, TUTORIAL_ORDER.index(p.stem) if p.stem in TUTORIAL_ORDER else len(TUTORIAL_ORDER), p.stem)
    return (2, 0, notebook)


def _nav(pages, here):
    "The sidebar: home, tutorials, modules, each link relative to `here`."
    groups = {'': [], 'Tutorials': [], 'Reference': []}
    for out, title, _ in (v for nb, v in sorted(pages.items(), key=lambda kv: nav_order(kv[1][0], Path(kv[0]).name))):
        g = '' if out == 'index.html' else 'Tutorials' if out.startswith('tutorials/') else 'Reference'
        groups[g].append((out, title))
    items = []
    for g, ps in groups.items():
        if g: items.append(f'<h2>{g}</h2>')
        items.append('<ul>' + ''.join(f'<li><a href="{_rel(o, here)}"{" class=here" if o == here else ""}>{html.escape(t)}</a></li>'
                                      for o, t in ps) + '</ul>')
    return '<nav>' + ''.join(items) + '</nav>'


def build(out=ROOT/'_site', proc=None, n_workers=2):
    "Render the processed notebooks to a static site in `out`; return the list of pages written."
    cfg, out = _cfg(), Path(out)
    proc, failures = (Path(proc), []) if proc else process(n_workers)
    pages = _pages(proc)
    src_of = {nb: (ROOT/'nbs'/nb.relative_to(proc)).resolve() for nb in pages}
    by_src = {src_of[nb]: p[0] for nb, p in pages.items()}
    if out.exists(): shutil.rmtree(out)
    for f in proc.rglob('*'):  # images and other files the pages use
        if f.is_file() and f.suffix not in ('.ipynb', '.yml', '.py', '.md', '.qmd') and not f.name.startswith('.'):
            (out/f.relative_to(proc)).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, out/f.relative_to(proc))
    bodies = {}
    for nb, (page, title, desc) in pages.items():
        cells = json.loads(nb.read_text())['cells']
        switches = switch_sources(json.loads(src_of[nb].read_text())['cells']) if src_of[nb].exists() else []
        bodies[nb] = _ids(_cells([c for c in cells if not (c['cell_type'] == 'raw' or '<!-- WARNING' in ''.join(c['source']))], switches))
    ids = {pages[nb][0]: set(re.findall(r'\bid="([^"]+)"', b)) for nb, b in bodies.items()}
    written = []
    for nb, (page, title, desc) in pages.items():
        body = _links(_doc_links(bodies[nb], _base(cfg), ids), page, src_of[nb], by_src, cfg)
        head = f"<h1>{html.escape(title)}</h1>" + (f'<p class="description">{_markdown(desc)[3:-5]}</p>' if desc else '')
        doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} – {cfg.lib_name}</title>'
               f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
               f'<body>{_nav(pages, page)}<main>{_ids(head)}{body}</main></body></html>')
        (out/page).parent.mkdir(parents=True, exist_ok=True)
        (out/page).write_text(doc, encoding='utf-8')
        written.append(page)
    return written, failures


def main(argv=None):
    if (argv or sys.argv[1:]) == ['--worker']:  # one of `process`'s workers
        import contextlib, io
        pairs = json.loads(sys.stdin.read())
        with contextlib.redirect_stdout(io.StringIO()): errors = _worker(pairs)
        print(json.dumps(errors)); return 0
    if (missing := missing_requirements()):
        print(f"tools/site.py renders the docs with nbdev and needs the dev extras: pip install -e \".[dev]\" "
              f"(missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(ROOT/'_site'), help='folder to write the site to (default: _site, git-ignored)')
    p.add_argument('--proc', default=None, help='use notebooks nbdev has already processed in this folder (default: process them now)')
    p.add_argument('--workers', type=int, default=2, help='processes for nbdev\'s processing')
    a = p.parse_args(argv)
    pages, failures = build(a.out, a.proc, a.workers)
    print(f"wrote {len(pages)} pages to {a.out}/ (open {Path(a.out)/'index.html'})")
    if failures:
        print(f"nbdev's documentation processing (as nbdev_docs runs it) failed on {len(failures)} notebook(s); their pages "
              "are built after splitting cells that mix imports with other code (see nbdev's FAQ):\n" + '\n'.join(failures), file=sys.stderr)
        return 1


if __name__ == '__main__': sys.exit(main())
