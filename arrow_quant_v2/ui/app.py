"""The ArrowQuant V2 app, as ``arrow-quant serve`` serves it (``panel serve`` runs this file).

It composes the page from :mod:`arrow_quant_v2.ui`; all state and behaviour live there. It
ships inside the package, so an installed wheel serves it; ``panel serve app`` from a source
checkout serves ``app/main.py``, which only calls :func:`serve` below.

Environment: ARROW_QUANT_MODEL_ROOTS (model folders, os.pathsep-separated),
ARROW_QUANT_OUTPUT_ROOT (where stores go), ARROW_QUANT_CACHE (sample models),
ARROW_QUANT_ALLOW_REMOTE=1 (answer browsers on other machines).
"""


def serve() -> None:
    """Add the page to the document Panel is building for this browser session."""
    import holoviews as hv
    import panel as pn

    from arrow_quant_v2.ui.serving import TITLE, page

    pn.extension(design="bootstrap")
    hv.extension("bokeh", logo=False)
    page().servable(title=TITLE)


# Panel runs a served script as a fresh module named "bokeh_app_<id>" once per session.
if __name__.startswith("bokeh_app"):
    serve()
