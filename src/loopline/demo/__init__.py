"""``loopline demo``: the whole closed loop, unattended, on the vehicle example.

- ``scenario``: what is played (sizes, traffic rate, drift onset), and the schedule of
  conditions over time;
- ``project``: the demo folder, its ``loopline.yaml`` and lake;
- ``traffic``: simulated CCTV cameras posting frames to production, and the labeller;
- ``story``: the run itself, calling the library as a person would;
- ``timeline``, ``watch``, ``display``: what happened when, and the live view of it;
- ``figures``, ``summary``, ``report``: the JSON timeline and the HTML report.

Nothing here is imported by ``loopline`` itself; ``loopline demo`` imports it when run.
"""

from __future__ import annotations
