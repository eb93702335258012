"""Every kind's public names resolve for type checkers (mypy in `nox -s lint`, pyright and IDEs too).

Not run by pytest: `mypy --config-file tests/typing/mypy.ini` checks it. Each name is imported from
its kind's package, as users write it, and used as a class of its kind's base, so a name that stops
resolving (or stops subclassing its base) fails the lint session. ``tests/plugin_system/test_kinds.py``
checks that this file imports every name the packages expose.
"""

from __future__ import annotations

from twinkle.advantage import (
    Advantage,
    GRPOAdvantage,
    REINFORCEAdvantage,
    RLOOAdvantage,
)
from twinkle.checkpoint_engine import (
    CheckpointEngine,
    LocalCheckpointEngine,
)
from twinkle.convert import (
    ChatGLMConverter,
    CheckpointConverter,
    ConversionError,
    DeepseekVLConverter,
    DeepseekVLHybridConverter,
    InternLM2Converter,
    find_converter,
    load_converted,
    read_state_dict,
    save_original,
)
from twinkle.dataloader import (
    DataLoader,
    RetrySampler,
    RowLoadError,
)
from twinkle.dataset import (
    Dataset,
    DatasetBase,
    DatasetMeta,
    IterableDataset,
    PackingDataset,
    pack_bins,
)
from twinkle.env import (
    Environment,
    Episode,
    GLMToolCallParser,
    HermesToolCallParser,
    InternLM2ToolCallParser,
    ParsedTurn,
    SandboxedPythonTool,
    StepResult,
    ToolCall,
    ToolCallParser,
    ToolEnvironment,
    run_episodes,
    tool_call_parser_for,
)
from twinkle.launcher import (
    Launcher,
    LocalLauncher,
)
from twinkle.loss import (
    CISPOLoss,
    CrossEntropyLoss,
    DAPOLoss,
    DPOLoss,
    DrGRPOLoss,
    GKDLoss,
    GRPOLoss,
    GSPOLoss,
    Loss,
    ORPOLoss,
    PPOLoss,
    SimPOLoss,
    TinkerLoss,
    ValueLoss,
)
from twinkle.metric import (
    Metric,
    TokenAccuracy,
)
from twinkle.model import (
    TransformersModel,
    TwinkleModel,
)
from twinkle.optim import (
    ASGD,
    LBFGS,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CosineWarmupScheduler,
    CyclicLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LinearWarmupScheduler,
    MultiplicativeLR,
    MultiStepLR,
    NAdam,
    OneCycleLR,
    PolynomialLR,
    RAdam,
    ReduceLROnPlateau,
    RMSprop,
    Rprop,
    SequentialLR,
    SparseAdam,
    StepLR,
)
from twinkle.patch import (
    ActivationCheckpointing,
    Bf16Adapters,
    CompileDecoderLayers,
    Fp8FrozenGemms,
    FusedLinearCrossEntropy,
    FusedLoraLinear,
    FusedLoraMLP,
    FusedOptimizer,
    GroupedLoraProjections,
    LigerKernels,
    MergedLoraForward,
    Patch,
    RecomputeSwiGLU,
    VarlenAttention,
)
from twinkle.preprocessor import (
    AlpacaProcessor,
    BadRowError,
    CompetitionMathProcessor,
    DPOProcessor,
    EmptyMessageFilter,
    Filter,
    GSM8KProcessor,
    LengthFilter,
    MessagesProcessor,
    Preprocessor,
    SelfCognitionProcessor,
)
from twinkle.processor import (
    InputProcessor,
    PaddingFreeProcessor,
)
from twinkle.reward import (
    Reward,
)
from twinkle.sampler import (
    Sampler,
    TorchSampler,
)
from twinkle.template import (
    ChatGLM2Template,
    ChatGLM3Template,
    GLM4Template,
    ImageLoadError,
    InternLM2Template,
    SequenceTooLongError,
    Template,
    TemplateError,
    VisionTemplate,
)
from twinkle.tracker import (
    JsonlTracker,
    MLflowTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    read_metrics,
    resolve_run_dir,
    tracker_names,
)


def kinds_resolve() -> list[object]:
    """Each built-in as a class of its kind's base: a type error if a name or its base relation breaks."""
    grpoadvantage: type[Advantage] = GRPOAdvantage
    rlooadvantage: type[Advantage] = RLOOAdvantage
    reinforceadvantage: type[Advantage] = REINFORCEAdvantage
    localcheckpointengine: type[CheckpointEngine] = LocalCheckpointEngine
    internlm2converter: type[CheckpointConverter] = InternLM2Converter
    chatglmconverter: type[CheckpointConverter] = ChatGLMConverter
    deepseekvlhybridconverter: type[CheckpointConverter] = DeepseekVLHybridConverter
    deepseekvlconverter: type[CheckpointConverter] = DeepseekVLConverter
    crossentropyloss: type[Loss] = CrossEntropyLoss
    grpoloss: type[Loss] = GRPOLoss
    ppoloss: type[Loss] = PPOLoss
    dapoloss: type[Loss] = DAPOLoss
    drgrpoloss: type[Loss] = DrGRPOLoss
    gspoloss: type[Loss] = GSPOLoss
    cispoloss: type[Loss] = CISPOLoss
    dpoloss: type[Loss] = DPOLoss
    simpoloss: type[Loss] = SimPOLoss
    orpoloss: type[Loss] = ORPOLoss
    gkdloss: type[Loss] = GKDLoss
    tinkerloss: type[Loss] = TinkerLoss
    valueloss: type[Loss] = ValueLoss
    tokenaccuracy: type[Metric] = TokenAccuracy
    transformersmodel: type[TwinkleModel] = TransformersModel
    fusedlinearcrossentropy: type[Patch] = FusedLinearCrossEntropy
    varlenattention: type[Patch] = VarlenAttention
    bf16adapters: type[Patch] = Bf16Adapters
    fusedloralinear: type[Patch] = FusedLoraLinear
    mergedloraforward: type[Patch] = MergedLoraForward
    groupedloraprojections: type[Patch] = GroupedLoraProjections
    fusedloramlp: type[Patch] = FusedLoraMLP
    fusedoptimizer: type[Patch] = FusedOptimizer
    activationcheckpointing: type[Patch] = ActivationCheckpointing
    recomputeswiglu: type[Patch] = RecomputeSwiGLU
    compiledecoderlayers: type[Patch] = CompileDecoderLayers
    ligerkernels: type[Patch] = LigerKernels
    fp8frozengemms: type[Patch] = Fp8FrozenGemms
    selfcognitionprocessor: type[Preprocessor] = SelfCognitionProcessor
    alpacaprocessor: type[Preprocessor] = AlpacaProcessor
    messagesprocessor: type[Preprocessor] = MessagesProcessor
    gsm8kprocessor: type[Preprocessor] = GSM8KProcessor
    competitionmathprocessor: type[Preprocessor] = CompetitionMathProcessor
    dpoprocessor: type[Preprocessor] = DPOProcessor
    lengthfilter: type[Filter] = LengthFilter
    emptymessagefilter: type[Filter] = EmptyMessageFilter
    paddingfreeprocessor: type[InputProcessor] = PaddingFreeProcessor
    torchsampler: type[Sampler] = TorchSampler
    chatglm2template: type[Template] = ChatGLM2Template
    chatglm3template: type[Template] = ChatGLM3Template
    glm4template: type[Template] = GLM4Template
    internlm2template: type[Template] = InternLM2Template
    visiontemplate: type[Template] = VisionTemplate
    jsonltracker: type[Tracker] = JsonlTracker
    tensorboardtracker: type[Tracker] = TensorBoardTracker
    wandbtracker: type[Tracker] = WandbTracker
    mlflowtracker: type[Tracker] = MLflowTracker
    toolenvironment: type[Environment] = ToolEnvironment
    return [
        grpoadvantage,
        rlooadvantage,
        reinforceadvantage,
        localcheckpointengine,
        internlm2converter,
        chatglmconverter,
        deepseekvlhybridconverter,
        deepseekvlconverter,
        crossentropyloss,
        grpoloss,
        ppoloss,
        dapoloss,
        drgrpoloss,
        gspoloss,
        cispoloss,
        dpoloss,
        simpoloss,
        orpoloss,
        gkdloss,
        tinkerloss,
        valueloss,
        tokenaccuracy,
        transformersmodel,
        fusedlinearcrossentropy,
        varlenattention,
        bf16adapters,
        fusedloralinear,
        mergedloraforward,
        groupedloraprojections,
        fusedloramlp,
        fusedoptimizer,
        activationcheckpointing,
        recomputeswiglu,
        compiledecoderlayers,
        ligerkernels,
        fp8frozengemms,
        selfcognitionprocessor,
        alpacaprocessor,
        messagesprocessor,
        gsm8kprocessor,
        competitionmathprocessor,
        dpoprocessor,
        lengthfilter,
        emptymessagefilter,
        paddingfreeprocessor,
        torchsampler,
        chatglm2template,
        chatglm3template,
        glm4template,
        internlm2template,
        visiontemplate,
        jsonltracker,
        tensorboardtracker,
        wandbtracker,
        mlflowtracker,
        toolenvironment,
    ]


#: Every public name, so that none is an unused import.
PUBLIC_NAMES: list[object] = [
    Advantage,
    GRPOAdvantage,
    REINFORCEAdvantage,
    RLOOAdvantage,
    CheckpointEngine,
    LocalCheckpointEngine,
    ChatGLMConverter,
    CheckpointConverter,
    ConversionError,
    DeepseekVLConverter,
    DeepseekVLHybridConverter,
    InternLM2Converter,
    find_converter,
    load_converted,
    read_state_dict,
    save_original,
    DataLoader,
    RetrySampler,
    RowLoadError,
    Dataset,
    DatasetBase,
    DatasetMeta,
    IterableDataset,
    PackingDataset,
    pack_bins,
    Launcher,
    LocalLauncher,
    CISPOLoss,
    CrossEntropyLoss,
    DAPOLoss,
    DPOLoss,
    DrGRPOLoss,
    GKDLoss,
    GRPOLoss,
    GSPOLoss,
    Loss,
    ORPOLoss,
    PPOLoss,
    SimPOLoss,
    TinkerLoss,
    Metric,
    TokenAccuracy,
    TransformersModel,
    TwinkleModel,
    ASGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    AdamW,
    Adamax,
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CosineWarmupScheduler,
    CyclicLR,
    ExponentialLR,
    LBFGS,
    LambdaLR,
    LinearLR,
    LinearWarmupScheduler,
    MultiStepLR,
    MultiplicativeLR,
    NAdam,
    OneCycleLR,
    PolynomialLR,
    RAdam,
    RMSprop,
    ReduceLROnPlateau,
    Rprop,
    SGD,
    SequentialLR,
    SparseAdam,
    StepLR,
    ActivationCheckpointing,
    Bf16Adapters,
    CompileDecoderLayers,
    Fp8FrozenGemms,
    FusedLinearCrossEntropy,
    FusedLoraLinear,
    FusedLoraMLP,
    FusedOptimizer,
    GroupedLoraProjections,
    LigerKernels,
    MergedLoraForward,
    Patch,
    RecomputeSwiGLU,
    VarlenAttention,
    AlpacaProcessor,
    BadRowError,
    CompetitionMathProcessor,
    DPOProcessor,
    EmptyMessageFilter,
    Filter,
    GSM8KProcessor,
    LengthFilter,
    MessagesProcessor,
    Preprocessor,
    SelfCognitionProcessor,
    InputProcessor,
    PaddingFreeProcessor,
    Reward,
    Sampler,
    TorchSampler,
    ChatGLM2Template,
    ChatGLM3Template,
    GLM4Template,
    ImageLoadError,
    InternLM2Template,
    SequenceTooLongError,
    Template,
    TemplateError,
    VisionTemplate,
    JsonlTracker,
    MLflowTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    read_metrics,
    resolve_run_dir,
    tracker_names,
    Environment,
    Episode,
    GLMToolCallParser,
    HermesToolCallParser,
    InternLM2ToolCallParser,
    ParsedTurn,
    SandboxedPythonTool,
    StepResult,
    ToolCall,
    ToolCallParser,
    run_episodes,
    tool_call_parser_for,
]
