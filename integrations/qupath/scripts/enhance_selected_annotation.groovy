/*
 * lpfm-toolkit: enhance the selected annotation of the open image with the `lpfm` command, then reload
 * the project so the result appears as a new entry (with its annotations, after import_lpfm_annotations).
 *
 * Set LPFM to the lpfm executable (e.g. /home/me/venvs/lpfm/bin/lpfm or C:\\lpfm\\Scripts\\lpfm.exe) and
 * PROMPT to what you want ("sr x2", "denoise", ...). Then select one annotation and Run.
 * The script saves the image data, exports this image's annotations to annotations/<entryID>.geojson,
 * runs `lpfm qupath enhance PROJECT --backend file --image <entryID> --annotation <object id>`, and
 * reloads the project (QuPath must not keep its stale copy: it would overwrite the new entries on save).
 * Written for QuPath 0.4–0.7. NOT run in CI: no QuPath there. Licence: GPL-3.0-or-later (lpfm-toolkit).
 */
import javafx.application.Platform
import qupath.lib.gui.dialogs.Dialogs
import qupath.lib.projects.ProjectIO

import java.awt.image.BufferedImage

def LPFM = 'lpfm'
def PROMPT = 'sr x2'
def ENGINE = 'auto'  // auto · lpfm · classical

def project = getProject()
def entry = getProjectEntry()
def selected = getSelectedObject()
if (project == null || entry == null) {
    Dialogs.showErrorMessage('lpfm', 'Open an image of a project first.')
    return
}
if (selected == null || !selected.isAnnotation()) {
    Dialogs.showErrorMessage('lpfm', 'Select one annotation to enhance.')
    return
}
def imageData = getCurrentImageData()
entry.saveImageData(imageData)
def folder = buildFilePath(PROJECT_BASE_DIR, 'annotations')
mkdirs(folder)
exportObjectsToGeoJson(imageData.getHierarchy().getAnnotationObjects(),
        buildFilePath(folder, entry.getID() + '.geojson'), 'FEATURE_COLLECTION')
project.syncChanges()

def command = [LPFM, 'qupath', 'enhance', project.getPath().toString(), '--backend', 'file',
               '--image', entry.getID(), '--annotation', selected.getID().toString(),
               '--engine', ENGINE, '--prompt', PROMPT]
println "lpfm: running ${command.join(' ')}"
def process = new ProcessBuilder(command).redirectErrorStream(true).start()
process.inputStream.eachLine('UTF-8') { println it }
int rc = process.waitFor()
if (rc != 0) {
    Dialogs.showErrorMessage('lpfm', "lpfm stopped with exit code ${rc}; see the script editor's log.")
    return
}
def reloaded = ProjectIO.loadProject(project.getPath().toFile(), BufferedImage)
Platform.runLater { getQuPath().setProject(reloaded) }
println 'lpfm: done; the project was reloaded. Run import_lpfm_annotations.groovy to load the annotations.'
