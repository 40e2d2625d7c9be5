"""The one way a measurement says it has nothing to measure on this pair."""


class NotMeasurable(RuntimeError):
    """A section's precondition does not hold (no call to stop, no hedge, no tool feature).

    The run goes on and the page reports the section as not measured, with this reason:
    a pair that shows no phenomenon is a result, not a crash.
    """
