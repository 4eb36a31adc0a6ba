"""At-least-once delivery: retry policy, per-connection windows, the tracker."""
