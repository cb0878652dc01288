"""IP-Adapter: an image prompt through decoupled cross-attention (arXiv 2308.06721); see ``layer.py``."""

from .config import IPAdapterConfig
from .files import ip_adapter_state_dict, load_ip_adapter_file, save_ip_adapter
from .layer import IPAdapterAdapter, set_ip_adapter_scale
from .wrapper import IPAdapterLayer

__all__ = ["IPAdapterAdapter", "IPAdapterConfig", "IPAdapterLayer", "ip_adapter_state_dict", "load_ip_adapter_file",
           "save_ip_adapter", "set_ip_adapter_scale"]
