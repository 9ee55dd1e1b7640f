import specdec.process_env  # noqa: F401  (first: before torch loads)
from draft_service.servicer import SERVICE_NAME, DraftServicer, add_to_server
from specdec.serving.model_service import main

# The default draft is the default model in bfloat16: a low-precision self-draft.
raise SystemExit(
    main("draft", DraftServicer, add_to_server, SERVICE_NAME, default_dtype="bfloat16", default_port=50052)
)
