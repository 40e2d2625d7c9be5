"""``guardrail audit``: does publishing this crosscoder leak A's capability into B?"""

import sys
import types

from guardrail.audit.policy import AuditPolicy
from guardrail.audit.report import AuditReport, Verdict
from guardrail.audit.run import NO_CAPABILITY, Judgement, audit, judge
from guardrail.audit.stats import PairedGain, minimum_detectable_gain, paired_gain

__all__ = ["NO_CAPABILITY", "AuditPolicy", "AuditReport", "Judgement", "PairedGain", "Verdict", "audit", "judge", "minimum_detectable_gain", "paired_gain"]


class _CallablePackage(types.ModuleType):
    """``gr.audit`` names both this package and the verb. Importing the package (``from
    guardrail.audit import AuditPolicy``) makes Python bind ``guardrail.audit`` to it, so the
    package itself runs the audit when called: ``gr.audit(cc, b)`` works in either case."""

    def __call__(self, *args, **kwargs) -> AuditReport:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
