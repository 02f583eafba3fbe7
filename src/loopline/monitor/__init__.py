"""Monitor: production accuracy against ground truth, drift, label-free estimates and
telemetry; alert rules with a lifecycle; channels; and the loop that retrains, re-gates and
redeploys when an alert fires.

Modules (each small, each a library API the CLI and the demo call):

- ``config``: the ``monitor:`` section (rules, channels, drift, retrain policy).
- ``stream``: the prediction log joined with its feedback, read incrementally.
- ``windows``: rolling windows by count and time, per version and segment.
- ``performance``: accuracy and macro precision/recall/F1 over a window.
- ``cusum``: the Bernoulli CUSUM early warning.
- ``reference``: what a version's build stored for monitoring (calibration, reference
  distributions, reference accuracy).
- ``estimate``: label-free accuracy from calibrated confidence.
- ``drift``: prediction, input-statistics and softmax drift tests.
- ``telemetry``: device and serving telemetry as metrics.
- ``lifecycle``: no-data, pending, firing, resolved; dedup, hysteresis, cooldown.
- ``channels``: log, webhook, Slack-compatible webhook, e-mail.
- ``prometheus``: the equivalent Prometheus alerting rules; ``exposition``: the monitor's own
  metrics for Prometheus to scrape.
- ``loop``: the actions (retrain, notify, approve) as a resumable state machine.
- ``notices``: which alert and loop transitions still need telling (from stored events);
  ``actions``: sending them, starting loops; ``resolutions``: retiring alerts of versions
  that stopped serving and expiring alerts of scopes that went quiet.
- ``passes``: one monitoring pass (``run_pass``); ``service``: the scheduler ``run``
  (``loopline monitor``), loop advancing and the alert report (``loopline alerts show``).
"""
