"""Run by ``panel serve --setup`` (``arrow-quant serve`` passes it): harden the server before it starts."""
from arrow_quant_v2.ui.serving import harden_server

harden_server()
