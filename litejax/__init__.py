"""litejax: hierarchical capacity-bounded Mixture-of-Experts whose per-token compute is provably bounded."""
from litejax.config import Config, ConfigError, load_config

__version__ = '0.1.0'
__all__ = ['Config', 'ConfigError', 'load_config', '__version__']
