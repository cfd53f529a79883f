"""Monitoring the model at a site: radiologists' final reports in, agreement and drift out.

``reports``    what both entrances (SR by C-STORE, HL7 ORU) record, and matching to studies
``scoring``    the AI draft beside the chosen report, per finding (and the periodic sweep)
``agreement``  sensitivity, PPV, specificity, F1 and kappa per finding, model and window
``metrics``    the Prometheus collector (:class:`~cxrnode.monitor.metrics.AgreementCollector`)
``service``    the monitor thread of ``cxrnode serve`` (MLLP listener and sweep)

The functions the admin web app and ``cxrnode monitor`` call are re-exported here.
"""

from cxrnode.monitor.agreement import disagreements, summaries, summary

__all__ = ["disagreements", "summaries", "summary"]
