"""The attributes an image and the model need, beyond what Table E.1-1 itself keeps or
replaces: the one reviewed list of the allow-list de-identification (:mod:`edge_agent.deid`).

An attribute reaches a de-identified instance only if the table gives it an action that
leaves something (``K``, ``C``, ``D``, ``Z``, ``U``, or a sequence kept for its references),
or it is named here, or the profile adds it (patient token, de-identification method).
Everything named here is a coded value, a number, a class UID, a structural element or a
short string naming equipment or technique (LO/SH: manufacturer, coil, kernel): no name, no
date, no instance UID, no free text (ST/LT/UT). Tests hold the list to that: every keyword
is in the DICOM dictionary, none is retired, none is a person name, date or time, the only
UIDs are class UIDs, and none is a row of the table (the table's action wins there).

Grouped by the module (PS3.3) that needs it, so a reviewer can ask "why is this here".
Sequences named here are kept and their items filtered by the same rules, at any depth.
"""

from __future__ import annotations

from types import MappingProxyType

from pydicom.datadict import tag_for_keyword

__all__ = ["KEEP", "KEEP_MODULES", "CLASS_UIDS"]

_MODULES: dict[str, tuple[str, ...]] = {
    "SOP Common": (
        "SOPClassUID", "SpecificCharacterSet", "InstanceNumber", "QualityControlImage",
    ),
    "General Series and Equipment": (
        "Modality", "SeriesNumber", "Laterality", "BodyPartExamined", "PatientPosition",
        "AnatomicalOrientationType", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
        "SpatialResolution", "PixelPaddingValue", "PixelPaddingRangeLimit",
    ),
    "General Image": (
        "ImageType", "AcquisitionNumber", "ImagesInAcquisition", "PatientOrientation",
        "ImageLaterality", "BurnedInAnnotation", "RecognizableVisualFeatures", "LossyImageCompression",
        "LossyImageCompressionRatio", "LossyImageCompressionMethod", "PresentationLUTShape",
        "DerivationCodeSequence", "AnatomicRegionSequence", "AnatomicRegionModifierSequence",
        "PrimaryAnatomicStructureSequence", "PrimaryAnatomicStructureModifierSequence",
    ),
    "Image Plane and Frame of Reference": (
        "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
        "SpacingBetweenSlices", "SliceLocation", "PositionReferenceIndicator",
        "PixelSpacingCalibrationType",
    ),
    "Image Pixel": (
        "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
        "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelAspectRatio",
        "SmallestImagePixelValue", "LargestImagePixelValue", "PixelData", "FloatPixelData",
        "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "ICCProfile",
        "ColorSpace", "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
        "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
        "SegmentedBluePaletteColorLookupTableData",
    ),
    "Multi-frame and Cine": (
        "NumberOfFrames", "FrameIncrementPointer", "StereoPairsPresent", "FrameTime", "FrameTimeVector",
        "CineRate", "RecommendedDisplayFrameRate", "StartTrim", "StopTrim", "ActualFrameDuration",
        "FrameDelay", "ImageTriggerDelay", "EffectiveDuration", "PreferredPlaybackSequencing",
        "FrameTimeVector",
    ),
    "Modality LUT, VOI LUT and Presentation": (
        "RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence", "ModalityLUTType",
        "LUTDescriptor", "LUTData", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
        "PresentationIntentType", "PresentationLUTSequence", "PixelIntensityRelationship",
        "PixelIntensityRelationshipSign",
    ),
    "X-Ray and CT Acquisition": (
        "KVP", "ExposureTime", "XRayTubeCurrent", "Exposure", "ExposureInuAs", "ExposureTimeInuS",
        "XRayTubeCurrentInuA", "AveragePulseWidth", "RadiationSetting", "RadiationMode", "FilterType",
        "FilterMaterial", "FilterThicknessMinimum", "FilterThicknessMaximum", "GeneratorPower",
        "FocalSpots", "AnodeTargetMaterial", "Grid", "CollimatorGridName", "CollimatorShape",
        "DataCollectionDiameter", "ReconstructionDiameter", "DistanceSourceToDetector",
        "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight", "RotationDirection",
        "ConvolutionKernel", "RevolutionTime", "SingleCollimationWidth", "TotalCollimationWidth",
        "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor", "CTDIvol", "ScanOptions",
        "ReconstructionTargetCenterPatient", "DataCollectionCenterPatient", "ExposureModulationType",
        "CalciumScoringMassFactorPatient", "ImagerPixelSpacing",
        "DetectorType", "DetectorConfiguration", "EstimatedRadiographicMagnificationFactor",
        "BodyPartThickness", "CompressionForce", "ViewPosition", "ViewCodeSequence",
        "ViewModifierCodeSequence", "PartialView", "PartialViewCodeSequence", "FieldOfViewShape",
        "FieldOfViewDimensions", "FieldOfViewOrigin", "FieldOfViewRotation", "FieldOfViewHorizontalFlip",
        "PositionerType", "PositionerPrimaryAngle", "PositionerSecondaryAngle", "RelativeXRayExposure",
        "ExposureIndex", "TargetExposureIndex", "DeviationIndex", "Sensitivity", "ExposureControlMode",
        "HalfValueLayer", "OrganDose", "EntranceDoseInmGy", "EntranceDose", "ImageAndFluoroscopyAreaDoseProduct",
        "BreastImplantPresent", "DetectorBinning", "DetectorElementPhysicalSize", "DetectorElementSpacing",
        "DetectorActiveShape", "DetectorActiveDimensions", "PixelSpacingCalibrationType",
    ),
    "MR Acquisition": (
        "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "SequenceName", "AngioFlag",
        "RepetitionTime", "EchoTime", "InversionTime", "NumberOfAverages", "ImagingFrequency",
        "ImagedNucleus", "EchoNumbers", "MagneticFieldStrength", "NumberOfPhaseEncodingSteps",
        "EchoTrainLength", "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth",
        "AcquisitionMatrix", "InPlanePhaseEncodingDirection", "FlipAngle", "VariableFlipAngleFlag",
        "SAR", "dBdt", "TriggerTime", "NominalInterval", "HeartRate", "CardiacNumberOfImages",
        "TriggerWindow", "LowRRValue", "HighRRValue", "IntervalsAcquired", "IntervalsRejected",
        "DiffusionBValue", "DiffusionGradientOrientation", "DiffusionDirectionality",
        "TemporalPositionIdentifier", "NumberOfTemporalPositions", "TemporalResolution",
        "ReceiveCoilName", "TransmitCoilName", "AcquisitionContrast", "PulseSequenceName",
        "EchoPulseSequence", "MultipleSpinEcho", "MultiPlanarExcitation", "PhaseContrast",
        "TimeOfFlightContrast", "Spoiling", "SteadyStatePulseSequence", "EchoPlanarPulseSequence",
        "SaturationRecovery", "SpectrallySelectedSuppression", "ParallelAcquisition",
        "ParallelReductionFactorInPlane", "ParallelReductionFactorOutOfPlane", "PartialFourier",
        "PartialFourierDirection", "ResonantNucleus", "MagneticFieldStrength", "EffectiveEchoTime",
        "ComplexImageComponent", "AcquisitionDuration",
    ),
    "Ultrasound": (
        "SequenceOfUltrasoundRegions", "RegionSpatialFormat", "RegionDataType", "RegionFlags",
        "RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1",
        "ReferencePixelX0", "ReferencePixelY0", "PhysicalUnitsXDirection", "PhysicalUnitsYDirection",
        "ReferencePixelPhysicalValueX", "ReferencePixelPhysicalValueY", "PhysicalDeltaX",
        "PhysicalDeltaY", "TransducerFrequency", "PulseRepetitionFrequency", "DopplerCorrectionAngle",
        "SteeringAngle", "DopplerSampleVolumeXPosition", "DopplerSampleVolumeYPosition",
        "TMLinePositionX0", "TMLinePositionY0", "TMLinePositionX1", "TMLinePositionY1",
        "PixelComponentOrganization", "PixelComponentMask", "PixelComponentRangeStart",
        "PixelComponentRangeStop", "PixelComponentPhysicalUnits", "PixelComponentDataType",
        "NumberOfTableBreakPoints", "TableOfXBreakPoints", "TableOfYBreakPoints",
        "NumberOfTableEntries", "TableOfPixelValues", "TableOfParameterValues", "TransducerType",
        "NumberOfStages", "NumberOfViewsInStage", "StageNumber", "ViewNumber", "MechanicalIndex",
        "BoneThermalIndex", "CranialThermalIndex", "SoftTissueThermalIndex", "DepthOfScanField",
        "UltrasoundColorDataPresent",
    ),
    "Enhanced Multi-frame Functional Groups": (
        "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelMeasuresSequence",
        "PlanePositionSequence", "PlaneOrientationSequence", "FrameContentSequence",
        "FrameAcquisitionNumber", "FrameAcquisitionDuration", "CardiacCyclePosition",
        "RespiratoryCyclePosition", "DimensionIndexValues", "TemporalPositionIndex", "StackID",
        "InStackPositionNumber", "FrameVOILUTSequence", "PixelValueTransformationSequence",
        "FrameAnatomySequence", "FrameLaterality", "CTImageFrameTypeSequence", "MRImageFrameTypeSequence",
        "FrameType", "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique",
        "CTAcquisitionTypeSequence", "AcquisitionType", "TubeAngle", "ConstantVolumeFlag",
        "FluoroscopyFlag", "CTAcquisitionDetailsSequence", "CTTableDynamicsSequence",
        "CTPositionSequence", "CTGeometrySequence", "CTReconstructionSequence",
        "ReconstructionAlgorithm", "ReconstructionFieldOfView", "ReconstructionPixelSpacing",
        "ReconstructionAngle", "ImageFilter", "CTExposureSequence", "CTXRayDetailsSequence",
        "CTAdditionalXRaySourceSequence", "MREchoSequence", "MRTimingAndRelatedParametersSequence",
        "MRFOVGeometrySequence", "MRModifierSequence", "MRImagingModifierSequence",
        "MRReceiveCoilSequence", "MRTransmitCoilSequence", "MRDiffusionSequence",
        "MRAveragesSequence", "MRMetaboliteMapSequence", "MRVelocityEncodingSequence",
        "CardiacSynchronizationSequence", "RespiratorySynchronizationSequence",
        "DimensionOrganizationSequence", "DimensionIndexSequence", "DimensionIndexPointer",
        "FunctionalGroupPointer", "DimensionOrganizationType", "XRay3DAcquisitionSequence",
        "FrameDisplayShutterSequence", "IrradiationEventIdentificationSequence",
        "PatientOrientationInFrameSequence", "PatientPhysiologicalStateSequence",
        "ContrastBolusUsageSequence", "ContrastBolusAgentNumber", "ContrastBolusAgentAdministered",
        "ContrastBolusAgentDetected", "ContrastBolusAgentPhase", "DerivationImageSequence",
        "UnassignedSharedConvertedAttributesSequence", "UnassignedPerFrameConvertedAttributesSequence",
    ),
    "Code Sequence Items": (
        "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
        "URNCodeValue", "MappingResource", "ContextIdentifier", "ContextUID",
        "ContextGroupExtensionFlag", "PurposeOfReferenceCodeSequence", "ModifierCodeSequence",
    ),
    "References": (
        "ReferencedSOPSequence", "ReferencedSeriesSequence", "ReferencedInstanceSequence",
        "CurrentRequestedProcedureEvidenceSequence", "ReferencedSOPClassUID", "ReferencedFrameNumber",
        "ReferencedSegmentNumber", "SpatialLocationsPreserved",
    ),
    "Structured Report Content Items": (
        "ValueType", "RelationshipType", "ConceptNameCodeSequence", "ConceptCodeSequence",
        "MeasuredValueSequence", "NumericValue", "FloatingPointValue", "RationalNumeratorValue",
        "RationalDenominatorValue", "MeasurementUnitsCodeSequence", "NumericValueQualifierCodeSequence",
        "ContinuityOfContent", "ContentTemplateSequence", "TemplateIdentifier", "GraphicType",
        "GraphicData", "ReferencedContentItemIdentifier", "CompletionFlag", "VerificationFlag",
        "PreliminaryFlag",
    ),
    "De-identification (set by the profile)": (
        "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    ),
}

# Class UIDs (they name a kind of object, never an instance): kept as they are.
CLASS_UIDS = frozenset(tag_for_keyword(k) for k in ("SOPClassUID", "ReferencedSOPClassUID", "ContextUID"))


def _tags() -> dict[int, str]:
    tags: dict[int, str] = {}
    for module, keywords in _MODULES.items():
        for keyword in keywords:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"keep list ({module}): {keyword} is not a DICOM keyword")
            tags.setdefault(tag, module)
    return tags


KEEP: MappingProxyType[int, str] = MappingProxyType(_tags())  # tag -> module that needs it
KEEP_MODULES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(_MODULES)
