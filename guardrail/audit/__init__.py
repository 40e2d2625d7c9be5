"""``guardrail audit``: does publishing this crosscoder leak A's capability into B?"""

from guardrail.audit.policy import AuditPolicy
from guardrail.audit.run import AuditReport, Verdict, audit, judge
from guardrail.audit.stats import PairedGain, paired_gain

__all__ = ["AuditPolicy", "AuditReport", "PairedGain", "Verdict", "audit", "judge", "paired_gain"]
