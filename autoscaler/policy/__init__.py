"""The policy core: the model of a policy file, its loader, and the pure decision functions."""

from autoscaler.policy.decide import decide
from autoscaler.policy.load import PolicyError, load_policy, parse_policy
from autoscaler.policy.model import Metric, Policy, PoolPolicy

__all__ = ["Metric", "Policy", "PolicyError", "PoolPolicy", "decide", "load_policy", "parse_policy"]
