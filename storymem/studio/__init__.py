"""storymem studio: a web page to write a story, watch it render, and curate its memory (``storymem studio``).

The page (:mod:`storymem.studio.app`, Gradio) is a thin layer over :class:`~storymem.studio.handlers.Studio`;
the render worker and everything the studio knows of the renderer are in :mod:`storymem.studio.runner`;
:mod:`~storymem.studio.workspace` confines the page to its workspace folder; :mod:`~storymem.studio.memory_edit`
and :mod:`~storymem.studio.takes` curate a render folder, which stays an ordinary `storymem render` folder.
Gradio is an optional dependency (``pip install "storymem[studio]"``); only the page needs it.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """``storymem studio`` (see :func:`storymem.studio.app.main`)."""
    from .app import main as app_main

    return app_main(argv)
